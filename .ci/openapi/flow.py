"""One flow through the Python client that openapi-python-client generated from
letterbox's /openapi.json (see run): a newsletter, subscribers, a letter, a send, then
the job until it completes and its deliveries. Exits non-zero with the reason if any
step fails. Usage: flow.py BASE_URL TOKEN (PYTHONPATH holds letterbox_client)."""

import sys
import time

from letterbox_client import AuthenticatedClient
from letterbox_client.api.jobs import list_deliveries, show_job
from letterbox_client.api.letters import create_letter, send_letter
from letterbox_client.api.newsletters import create_newsletter
from letterbox_client.api.subscribers import add_subscribers
from letterbox_client.models import CreateLetter, CreateNewsletter, SendRequest


def check(response, status, what):
    if response.status_code != status:
        sys.exit(f"{what}: expected {status}, got {response.status_code}: {response.content!r}")
    return response.parsed


def main(base, token):
    client = AuthenticatedClient(base_url=base, token=token)
    newsletter = check(
        create_newsletter.sync_detailed(
            client=client, body=CreateNewsletter(name="Generated", from_="Generated <news@example.com>")
        ),
        201,
        "create a newsletter",
    )
    people = [{"email": f"reader{i}@example.org", "name": f"Reader {i}"} for i in range(5)]
    summary = check(
        add_subscribers.sync_detailed(newsletter.id, client=client, body=people), 201, "import subscribers"
    )
    if summary.inserted != 5:
        sys.exit(f"import: expected 5 inserted, got {summary.to_dict()}")
    letter = check(
        create_letter.sync_detailed(
            newsletter.id, client=client, body=CreateLetter(subject="Hello {{ name }}", text="Hi {{ name }}")
        ),
        201,
        "create a letter",
    )
    submitted = check(
        send_letter.sync_detailed(letter.id, client=client, body=SendRequest(concurrency=2)), 202, "send"
    )
    job_id = submitted.job_id
    deadline = time.time() + 60
    while True:
        job = check(show_job.sync_detailed(job_id, client=client), 200, "read the job")
        if job.state.value == "completed":
            break
        if time.time() > deadline:
            sys.exit(f"job {job_id} did not complete: {job.to_dict()}")
        time.sleep(0.2)
    if job.counts.delivered != 5:
        sys.exit(f"expected 5 delivered: {job.to_dict()}")
    page = check(list_deliveries.sync_detailed(job_id, client=client), 200, "read the deliveries")
    items = [item.to_dict() for item in page.items]
    states = sorted({item["state"] for item in items})
    if len(items) != 5 or states != ["delivered"]:
        sys.exit(f"deliveries: {items}")
    print(f"generated client: newsletter {newsletter.id}, job {job_id}: {job.counts.delivered} delivered")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
