"""The demo site's client accounts: the page whose buttons call the demo's tasks with ``delay()``.

The modules follow the data flow: ``models`` (the accounts), ``actions`` (what
each button enqueues), ``receivers`` (a save asks for a refresh; a finished
call stamps its account), ``activity`` (what the page shows of the
invocations and of the provider), ``views`` and ``urls``.
"""
