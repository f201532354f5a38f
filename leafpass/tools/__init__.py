"""leafpass's tools, over the public API: ``python -m leafpass demo`` (:mod:`.demo`, with
:mod:`.zero3_compare` behind it), ``python -m leafpass explain`` (:mod:`.explain`,
:mod:`.explain_report`) and the collective probes of :mod:`.deepspeed_probe`. The library
core never imports them."""
