"""leafpass's tools, over the public API: ``python -m leafpass demo`` (:mod:`.demo`, with
:mod:`.zero3_compare` behind it and its parts in ``zero3_*.py``), ``python -m leafpass
explain`` (:mod:`.explain`, with :mod:`.explain_report` behind it and its parts in
``explain_*.py``) and the collective probes of :mod:`.deepspeed_probe`. The library core
never imports them."""
