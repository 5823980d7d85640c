"""The service on S3-compatible storage: a real moto S3 server, uploads and results in a
bucket, and inputs given as s3:// URLs."""

from __future__ import annotations

import pytest

from tests.support.serving_stack import S3_ENV, Stack, check_output, submit

pytestmark = [pytest.mark.postgres, pytest.mark.e2e]

STORE = "lipsync-store"
INPUTS = "customer-inputs"


@pytest.fixture(scope="module")
def s3(moto_server_url, monkeypatch_module):
    for k, v in S3_ENV.items():
        monkeypatch_module.setenv(k, v)
    from lipsync.serving.storage import s3_client

    client = s3_client(moto_server_url)
    for bucket in (STORE, INPUTS):
        client.create_bucket(Bucket=bucket)
    return client


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def stack(postgres_server, moto_server_url, s3, tmp_path_factory):
    s = Stack(
        postgres_server, "s3_tests", tmp_path_factory.mktemp("s3"),
        LIPSYNC_STORAGE_URL=f"s3://{STORE}/service", LIPSYNC_S3_ENDPOINT_URL=moto_server_url,
        LIPSYNC_INPUT_URL_BUCKETS=INPUTS, **S3_ENV,
    )  # fmt: skip
    s.start_api()
    s.start_worker()
    s.wait_api()
    s.wait_workers()
    yield s
    s.close()


def bucket_keys(s3, job_id: str) -> list[str]:
    listing = s3.list_objects_v2(Bucket=STORE, Prefix="service/")
    return sorted(o["Key"] for o in listing.get("Contents", []) if job_id in o["Key"])


def fetch(client, job_id, path):
    with client.stream("GET", f"/v1/jobs/{job_id}/result") as r:
        assert r.status_code == 200
        assert int(r.headers["content-length"]) > 0
        with open(path, "wb") as f:
            for block in r.iter_bytes():
                f.write(block)


def test_uploaded_job_end_to_end_on_s3(stack, s3, serving_media, tmp_path):
    m = serving_media
    with stack.client(stack.create_key("s3-user")) as c:
        job = submit(c, m.video, m.audio, steps=1).json()
        row = stack.wait_status(job["id"], ("succeeded", "failed"))
        assert row["status"] == "succeeded", row["error"]
        fetch(c, job["id"], tmp_path / "out.mp4")
    check_output(tmp_path / "out.mp4", m.frames, m.seconds)
    jid = job["id"]
    assert bucket_keys(s3, jid) == [
        f"service/results/{jid}.mp4",
        f"service/uploads/{jid}/audio.wav",
        f"service/uploads/{jid}/video.mp4",
    ]
    body = s3.get_object(Bucket=STORE, Key=f"service/results/{jid}.mp4")["Body"].read()
    assert body == (tmp_path / "out.mp4").read_bytes()


def test_inputs_from_s3_urls(stack, s3, serving_media, tmp_path):
    m = serving_media
    s3.upload_file(str(m.video), INPUTS, "talks/face.mp4", ExtraArgs={"ContentType": "video/mp4"})
    s3.upload_file(str(m.audio), INPUTS, "talks/speech.wav")
    with stack.client(stack.create_key("s3-urls")) as c:
        r = c.post(
            "/v1/jobs",
            data={
                "video_url": f"s3://{INPUTS}/talks/face.mp4",
                "audio_url": f"s3://{INPUTS}/talks/speech.wav",
                "steps": "1",
            },
        )
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        row = stack.wait_status(job_id, ("succeeded", "failed"))
        assert row["status"] == "succeeded", row["error"]
        fetch(c, job_id, tmp_path / "out.mp4")
        check_output(tmp_path / "out.mp4", m.frames, m.seconds)
        # the inputs were copied: the service does not depend on the caller's objects
        assert f"service/uploads/{job_id}/video.mp4" in bucket_keys(s3, job_id)
        r = c.post("/v1/jobs", data={"video_url": f"s3://{INPUTS}/talks/missing.mp4"})
        assert r.status_code == 422 and r.json()["code"] == "not_found"
        r = c.post("/v1/jobs", data={"video_url": f"s3://{STORE}/service/results/{job_id}.mp4"})
        assert r.status_code == 403  # never read the service's own bucket on a caller's behalf
