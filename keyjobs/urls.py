"""keyjobs' own URLs, outside the admin: ``path("keyjobs/", include("keyjobs.urls"))`` opts in.

- ``metrics``: the Prometheus text format (``keyjobs.monitor.metrics``), closed unless the request carries
  ``KEYJOBS_METRICS_TOKEN`` as a bearer token or comes from a staff session.
"""

from django.urls import path

from .monitor.metrics import metrics

app_name = "keyjobs"
urlpatterns = [path("metrics", metrics, name="metrics")]
