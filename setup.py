"""Only for what pyproject.toml cannot say: ``leafpass-startup.pth`` goes to the top of
site-packages in a wheel (so ``TrainingArguments(torch_compile_backend="z3leaf")`` needs no
``import leafpass``; see leafpass/integrations/after_import.py). Editable installs
(``pip install -e``) do not carry it: there, ``import leafpass`` before the Trainer."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

STARTUP_PTH = "leafpass-startup.pth"


class BuildPyWithStartupHook(build_py):
    def run(self):
        super().run()
        self.copy_file(os.path.join("leafpass", "integrations", STARTUP_PTH), os.path.join(self.build_lib, STARTUP_PTH))

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, STARTUP_PTH)]


setup(cmdclass={"build_py": BuildPyWithStartupHook})
