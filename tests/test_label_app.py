"""The labeling store and HTTP API: tokens, assignment, transactional submissions, on SQLite and PostgreSQL."""

from __future__ import annotations

import concurrent.futures as cf
import uuid

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from alignflow.tasks.label.app import create_app
from alignflow.tasks.label.store import LabelStore, hash_token

PG_ADMIN_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"


def make_items(n: int, k: int = 3, gold: int = 0) -> list[dict]:
    out = []
    for i in range(n):
        it = {"item_id": f"i{i}", "prompt_id": f"p{i}", "prompt": f"Question {i}?",
              "responses": [{"id": f"r{j}", "text": f"answer {j} to {i}", "policy": f"pol{j % 2}"} for j in range(k)]}
        if i < gold:
            it["gold"] = [[f"r{j}"] for j in range(k)]
        out.append(it)
    return out


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = LabelStore(f"sqlite:///{tmp_path / 'label.db'}")
        yield s
        s.close()
        return
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            name = f"alignflow_label_{uuid.uuid4().hex[:10]}"
            conn.exec_driver_sql(f"CREATE DATABASE {name}")
    except sa.exc.OperationalError as exc:
        pytest.skip(f"PostgreSQL at 127.0.0.1:5432 is not reachable: {exc.orig}")
    s = LabelStore(PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name)
    try:
        yield s
    finally:
        s.close()
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.dispose()


def _client(store):
    return TestClient(create_app(store, report_rounds=50))


def _auth(token):
    return {"Authorization": f"Bearer {token}"}


def test_tokens_are_stored_as_hashes_and_wrong_tokens_see_nothing(store):
    admin = store.invite("owner", admin=True)
    ann = store.invite("ann")
    with store.engine.connect() as conn:
        hashes = [r[0] for r in conn.execute(sa.text("SELECT token_hash FROM label_labelers"))]
    assert hash_token(ann) in hashes and ann not in hashes
    store.create_batch("b1", "batch one", make_items(2))
    c = _client(store)
    for path in ("/api/me", "/api/batches/b1/next", "/api/admin/batches"):
        for headers in ({}, _auth("nope"), {"Authorization": "Basic x"}):
            r = c.get(path, headers=headers)
            assert r.status_code == 401 and "token" in r.json()["error"]
            assert "answer" not in r.text
    assert c.get("/api/admin/batches/b1/export", headers=_auth(ann)).status_code == 403
    assert c.post("/api/admin/labelers", headers=_auth(ann), json={"name": "x"}).status_code == 403
    assert c.get("/api/admin/batches", headers=_auth(admin)).status_code == 200
    assert c.get("/api/me", headers=_auth(ann)).json()["name"] == "ann"


def test_bad_rankings_get_400_with_the_reason(store):
    tok = store.invite("ann")
    store.create_batch("b1", "b", make_items(1, k=3))
    c = _client(store)
    item = c.get("/api/batches/b1/next", headers=_auth(tok)).json()
    cases = {
        "not one of this item's responses": [["r0"], ["r1"], ["zz"]],
        "ranked more than once": [["r0"], ["r1"], ["r1"]],
        "not ranked": [["r0"], ["r1"]],
    }
    for reason, ranking in cases.items():
        r = c.post("/api/submissions", headers=_auth(tok),
                   json={"item_id": item["item_id"], "idempotency_key": uuid.uuid4().hex, "ranking": ranking})
        assert r.status_code == 400 and reason in r.json()["error"], r.text
    r = c.post("/api/submissions", headers=_auth(tok), content=b"{not json")
    assert r.status_code == 400 and "not JSON" in r.json()["error"]
    r = c.post("/api/submissions", headers=_auth(tok), content=b"x" * 1_000_001)
    assert r.status_code == 413 and "over 1000000 bytes" in r.json()["error"]
    r = c.post("/api/submissions", headers=_auth(tok), json={"item_id": item["item_id"], "idempotency_key": "k", "ab": 1})
    assert r.status_code == 400 and "2 responses" in r.json()["error"]
    assert store.counts("b1")["submissions"] == 0


def test_retries_never_duplicate_and_a_second_answer_is_refused_or_replaces(store):
    tok = store.invite("ann")
    store.create_batch("b1", "b", make_items(2, k=2))
    c = _client(store)
    item = c.get("/api/batches/b1/next", headers=_auth(tok)).json()
    a, b = [r["id"] for r in item["responses"]]
    body = {"item_id": item["item_id"], "idempotency_key": "click-1", "ab": -2}
    first = c.post("/api/submissions", headers=_auth(tok), json=body)
    again = c.post("/api/submissions", headers=_auth(tok), json=body)  # a double click / retried request
    assert first.status_code == 201 and again.status_code == 200 and again.json()["duplicate"]
    assert again.json()["submission_id"] == first.json()["submission_id"]
    other = c.post("/api/submissions", headers=_auth(tok), json={**body, "idempotency_key": "click-2", "ab": 3})
    assert other.status_code == 409 and "replace" in other.json()["error"]
    rep = c.post("/api/submissions", headers=_auth(tok), json={**body, "idempotency_key": "click-3", "ab": 3,
                                                                 "replace": True})
    assert rep.status_code == 201 and rep.json()["revision"] == 2
    rows = store.export("b1")
    assert len(rows) == 1 and rows[0]["groups"] == [[b], [a]] and rows[0]["strength"] == 3
    assert rows[0]["shown_order"] == [a, b]


def test_assignment_overlap_evenness_and_never_twice(store):
    toks = [store.invite(f"lab{i}") for i in range(4)]
    store.create_batch("b1", "b", make_items(6, k=3), overlap=2)
    c = _client(store)
    seen: dict[str, list[str]] = {}
    # Round robin: every labeler takes one item at a time; items fill evenly (each reaches 1 before any reaches 2).
    for rnd in range(4):
        for i, tok in enumerate(toks):
            item = c.get("/api/batches/b1/next", headers=_auth(tok)).json()
            if item.get("done"):
                continue
            seen.setdefault(f"lab{i}", []).append(item["item_id"])
            ranking = [[r["id"]] for r in item["responses"]]
            r = c.post("/api/submissions", headers=_auth(tok),
                       json={"item_id": item["item_id"], "idempotency_key": uuid.uuid4().hex, "ranking": ranking})
            assert r.status_code == 201, r.text
            if rnd == 0 and i == 3:
                loads = [sum(x.count(f"b1/i{k}") for x in seen.values()) for k in range(6)]
                assert max(loads) == 1
    for items_of in seen.values():
        assert len(items_of) == len(set(items_of))  # never twice to one labeler
    counts = store.counts("b1")
    assert counts["submissions"] == 12 and counts["complete_items"] == 6
    assert c.get("/api/batches/b1/next", headers=_auth(toks[0])).json()["done"] is True


def test_gold_items_go_to_every_labeler_and_shown_order_is_recorded(store):
    toks = [store.invite(f"lab{i}") for i in range(3)]
    store.create_batch("b1", "b", make_items(3, k=3, gold=1), overlap=1)
    c = _client(store)
    for tok in toks:
        while True:
            item = c.get("/api/batches/b1/next", headers=_auth(tok)).json()
            if item.get("done"):
                break
            again = c.get("/api/batches/b1/next", headers=_auth(tok)).json()
            assert again["item_id"] == item["item_id"] and again["responses"] == item["responses"]  # reload
            r = c.post("/api/submissions", headers=_auth(tok), json={
                "item_id": item["item_id"], "idempotency_key": uuid.uuid4().hex,
                "ranking": [[r["id"]] for r in item["responses"]]})
            assert r.status_code == 201
    rows = store.export("b1")
    gold_rows = [r for r in rows if r["gold"] is not None]
    assert len(gold_rows) == 3 and {r["labeler"] for r in gold_rows} == {"lab0", "lab1", "lab2"}
    assert all(r["groups"] == [[x] for x in r["shown_order"]] for r in rows)


def test_submission_needs_the_item_served_first(store):
    tok = store.invite("ann")
    store.create_batch("b1", "b", make_items(2))
    r = _client(store).post("/api/submissions", headers=_auth(tok), json={
        "item_id": "b1/i1", "idempotency_key": "k", "ranking": [["r0"], ["r1"], ["r2"]]})
    assert r.status_code == 403 and "not served" in r.json()["error"]


def test_concurrent_labelers_each_submission_stored_exactly_once(store):
    toks = [store.invite(f"lab{i}") for i in range(8)]
    store.create_batch("b1", "b", make_items(12, k=3), overlap=3)
    app = create_app(store)

    def work(tok):
        c = TestClient(app)
        accepted = []
        while True:
            item = c.get("/api/batches/b1/next", headers=_auth(tok)).json()
            if item.get("done"):
                return accepted
            body = {"item_id": item["item_id"], "idempotency_key": uuid.uuid4().hex,
                    "ranking": [[r["id"]] for r in item["responses"]]}
            r1 = c.post("/api/submissions", headers=_auth(tok), json=body)
            r2 = c.post("/api/submissions", headers=_auth(tok), json=body)  # retry
            assert r1.status_code == 201 and r2.status_code == 200, (r1.text, r2.text)
            accepted.append(r1.json()["submission_id"])

    with cf.ThreadPoolExecutor(8) as pool:
        accepted = [sid for part in pool.map(work, toks) for sid in part]
    rows = store.export("b1")
    assert sorted(accepted) == sorted(r["submission_id"] for r in rows)
    assert len(accepted) == 36 == store.counts("b1")["submissions"]  # 12 items x overlap 3, none over
    per_item = {}
    for r in rows:
        per_item.setdefault(r["item_id"], []).append(r["labeler"])
    assert all(len(v) == 3 == len(set(v)) for v in per_item.values())


def test_report_and_page(store):
    admin = store.invite("owner", admin=True)
    toks = [store.invite(f"lab{i}") for i in range(2)]
    store.create_batch("b1", "b", make_items(4, k=3), overlap=2, instructions="Prefer <b>short</b> answers")
    c = _client(store)
    for tok in toks:
        while not (item := c.get("/api/batches/b1/next", headers=_auth(tok)).json()).get("done"):
            assert item["instructions"] == "Prefer <b>short</b> answers"
            ranking = [[r] for r in sorted(x["id"] for x in item["responses"])]  # r0 > r1 > r2
            c.post("/api/submissions", headers=_auth(tok), json={"item_id": item["item_id"],
                                                                "idempotency_key": uuid.uuid4().hex,
                                                                "ranking": ranking})
    rep = c.get("/api/admin/batches/b1/report", headers=_auth(admin)).json()
    assert rep["agreement"]["pairwise"] == 1.0 and rep["counts"]["complete_items"] == 4
    assert [r["item"] for r in rep["leaderboard"]["rows"]] == ["pol0", "pol1"]
    page = c.get("/")
    assert page.status_code == 200 and "textContent" in page.text and "innerHTML" not in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]


def test_cli_user_error_is_one_line_and_debug_shows_the_exception(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from alignflow.flows.cli import app

    monkeypatch.setenv("ALIGNFLOW_DEBUG", "0")  # restored afterwards: `--debug` below sets it in this process
    r = CliRunner().invoke(app, ["label", "export", "--batch", "nope", "--workdir", str(tmp_path)])
    assert r.exit_code == 2 and r.output.strip() == "error: no batch 'nope'"
    r = CliRunner().invoke(app, ["label", "invite", "ann", "--workdir", str(tmp_path)])
    assert r.exit_code == 0 and r.output.startswith("http://127.0.0.1:8765/#token=")
    r = CliRunner().invoke(app, ["label", "invite", "ann", "--workdir", str(tmp_path)])
    assert r.exit_code == 2 and r.output.strip() == "error: labeler 'ann' exists already"
    r = CliRunner().invoke(app, ["--debug", "label", "export", "--batch", "nope", "--workdir", str(tmp_path)])
    assert r.exit_code == 2 and "Traceback" in r.output and "NotFound: no batch 'nope'" in r.output
    assert r.output.strip().splitlines()[-1] == "error: no batch 'nope'"
