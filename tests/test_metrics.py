"""The metrics endpoint: Prometheus' text format, read by prometheus_client's own parser; closed to strangers."""

import pytest
from django.test import Client
from django.urls import reverse
from prometheus_client.parser import text_string_to_metric_families

from keyjobs import rollup
from keyjobs.models import Invocation
from keyjobs.status import Status
from keyjobs.worker import Worker
from tests import jobs
from tests.factories import InvocationFactory, staff

pytestmark = pytest.mark.django_db(transaction=True)

URL = "/keyjobs/metrics"


def families(text: str) -> dict[str, object]:
    return {family.name: family for family in text_string_to_metric_families(text)}


def samples(family: object, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(sample.labels.items())): sample.value
            for sample in family.samples if sample.name == name}  # type: ignore[attr-defined]


def test_the_endpoint_is_mounted_by_keyjobs_urls() -> None:
    assert reverse("keyjobs:metrics") == URL


def test_a_scrape_parses_and_counts_what_ran(settings, tmp_path) -> None:
    settings.KEYJOBS_METRICS_TOKEN = "s3cret"
    for number in range(3):
        jobs.add.delay(number, 1)
    jobs.boom.delay("no")
    jobs.flaky.delay(str(tmp_path / "count"), 1)
    Worker(threads=2, burst=True, poll_interval=0.01).run()
    rollup.roll_up(using="default")
    InvocationFactory(task_name="tests.jobs.add", status=Status.REGISTERED)

    response = Client().get(URL, headers={"Authorization": "Bearer s3cret"})

    assert response.status_code == 200 and response["Content-Type"].startswith("text/plain; version=0.0.4")
    found = families(response.content.decode())
    add = (("task", "tests.jobs.add"),)
    assert samples(found["keyjobs_enqueued"], "keyjobs_enqueued_total")[add] == 3
    finished = samples(found["keyjobs_finished"], "keyjobs_finished_total")
    assert finished[(("status", "success"), ("task", "tests.jobs.add"))] == 3
    assert finished[(("status", "failed"), ("task", "tests.jobs.boom"))] == 1
    assert finished[(("status", "retry"), ("task", "tests.jobs.flaky"))] == 1
    # Histograms: cumulative buckets ending at +Inf, which is the count.
    duration = found["keyjobs_run_duration_seconds"]
    buckets = [(dict(key)["le"], value) for key, value in
               samples(duration, "keyjobs_run_duration_seconds_bucket").items() if dict(key)["task"] == "tests.jobs.add"]
    values = [value for _, value in sorted(buckets, key=lambda bucket: float(bucket[0]))]
    assert values == sorted(values) and values[-1] == 3
    assert samples(duration, "keyjobs_run_duration_seconds_count")[add] == 3
    assert samples(found["keyjobs_wait_seconds"], "keyjobs_wait_seconds_count")[add] == 3
    # Gauges, read now.
    assert samples(found["keyjobs_waiting"], "keyjobs_waiting")[add] == 1
    assert samples(found["keyjobs_runners_alive"], "keyjobs_runners_alive")[()] == 0
    assert samples(found["keyjobs_oldest_waiting_age_seconds"], "keyjobs_oldest_waiting_age_seconds")[()] >= 0


def test_an_anonymous_request_is_refused(settings) -> None:
    settings.KEYJOBS_METRICS_TOKEN = "s3cret"
    assert Client().get(URL).status_code == 403
    assert Client().get(URL, headers={"Authorization": "Bearer wrong"}).status_code == 403


def test_without_a_token_set_no_bearer_opens_it(settings) -> None:
    settings.KEYJOBS_METRICS_TOKEN = ""
    assert Client().get(URL, headers={"Authorization": "Bearer "}).status_code == 403


def test_a_staff_session_may_read_it_and_a_user_who_is_not_staff_may_not(django_user_model) -> None:
    assert staff(django_user_model, "watcher").get(URL).status_code == 200
    outsider = django_user_model.objects.create_user("outsider", password="x")
    client = Client()
    client.force_login(outsider)
    assert client.get(URL).status_code == 403


def test_label_values_are_escaped(settings) -> None:
    settings.KEYJOBS_METRICS_TOKEN = "t"
    Invocation.objects.create(task_name='odd"task\\name\nx', queue="default")
    text = Client().get(URL, headers={"Authorization": "Bearer t"}).content.decode()
    waiting = samples(families(text)["keyjobs_waiting"], "keyjobs_waiting")
    assert waiting[(("task", 'odd"task\\name\nx'),)] == 1
