"""The monitor: timeline, dashboard and key view, read from the invocations and their history.

It follows the data flow in three parts: ``queries`` reads what each page
shows, ``display`` turns values into what a person reads (badges, labels,
durations, links), and ``views`` answers HTTP. The views are mounted by
``InvocationAdmin.get_urls()`` inside ``admin_site.admin_view``.
"""
