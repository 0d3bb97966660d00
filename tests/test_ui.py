"""The UIs as a user sees them: headless Chromium (selenium) on the MLflow UI of two finished pipelines and on the
Prefect UI of their flow runs and artifacts. Screenshots go to ALIGNFLOW_SCREENSHOTS (default: the test's tmp dir).

Needs Debian's `chromium` and `chromium-driver` and the `selenium` package; skipped with the reason when absent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.parse
from pathlib import Path

import mlflow
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _servers import BIN, clean_env, free_port, headless_chromium, prefect_server, spawn, stop, wait_http  # noqa: E402

pytestmark = pytest.mark.slow

TINY = [
    "experiment=alignflow/ui-test", "pipeline.stages=[ingest,base,sft]", "generate.questions=60",
    "base.model.vocab_size=400", "base.model.max_length=64", "base.train.max_steps=4", "base.train.batch_size=4",
    "base.train.eval_every=4", "base.train.log_every=2", "base.train.warmup_steps=1",
    "sft.model.max_length=64", "sft.train.max_steps=4", "sft.train.batch_size=4", "sft.train.eval_every=4",
    "sft.train.log_every=2", "sft.train.warmup_steps=1", "sft.generation_prompts=1", "sft.max_new_tokens=4",
]


@pytest.fixture(scope="module")
def browser():
    yield from headless_chromium("1600,1000")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """Two pipeline runs against a real Prefect server (its UI), then `mlflow ui` on their SQLite store."""
    root = tmp_path_factory.mktemp("ui")
    work = root / "work"
    with prefect_server(root / "prefect") as api:
        env = clean_env(PREFECT_API_URL=api, PREFECT_HOME=str(root / "client-home"))
        for extra in ([], []):  # the second pipeline is all cache hits: cheap, and still a run to compare
            args = [str(BIN / "alignflow"), "pipeline", "--workdir", str(work)]
            for item in [*TINY, *extra]:
                args += ["--set", item]
            proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        port = free_port()
        ui = spawn([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}",
                    "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                   clean_env(), root / "mlflow-ui.log")
        try:
            wait_http(f"http://127.0.0.1:{port}/health", 120, ui, root / "mlflow-ui.log")
            yield {"work": work, "mlflow": f"http://127.0.0.1:{port}", "prefect": api.removesuffix("/api"),
                   "api": api}
        finally:
            stop(ui)


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("ALIGNFLOW_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _see(driver, url: str | None, *texts: str, timeout: float = 90) -> str:
    """Open ``url`` (None: stay on the page) and wait until the page shows every one of ``texts``; return the page text."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    if url is not None:
        driver.get(url)
    try:
        WebDriverWait(driver, timeout, poll_frequency=1).until(
            lambda d: all(t in d.find_element(By.TAG_NAME, "body").text for t in texts))
    except TimeoutException:
        body = driver.find_element(By.TAG_NAME, "body").text
        missing = [t for t in texts if t not in body]
        raise AssertionError(f"{url}: {missing} not shown; page text: {body[:3000]}") from None
    return driver.find_element(By.TAG_NAME, "body").text


def _mlflow_runs(work: Path):
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("alignflow/ui-test")
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`alignflow.stage` = 'pipeline'",
                                 order_by=["attributes.start_time ASC"])
    return client, exp, parents


def test_mlflow_ui_shows_the_pipelines_their_stages_and_the_compare_view(browser, finished, shots):
    client, exp, parents = _mlflow_runs(finished["work"])
    assert len(parents) == 2
    base = finished["mlflow"]
    # the experiment's training runs: the pipeline runs, and their stages once the nested rows are expanded
    _see(browser, f"{base}/#/experiments/{exp.experiment_id}/runs", "pipeline")
    from selenium.webdriver.common.by import By

    browser.find_element(By.XPATH, "//a[normalize-space(.)='pipeline']/ancestor::div[contains(@class,"
                                   "'ag-cell-wrapper')][1]//button[contains(@data-component-id,'runnamecell')]").click()
    _see(browser, None, "ingest", "base", "sft")
    browser.save_screenshot(str(shots / "mlflow-experiment.png"))
    # a nested stage run of the first pipeline (the one that trained): its metrics
    child = client.search_runs([exp.experiment_id], filter_string=(
        f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}' and tags.`alignflow.stage` = 'sft'"))[0]
    _see(browser, f"{base}/#/experiments/{exp.experiment_id}/runs/{child.info.run_id}", "train/loss", "eval/loss",
         "eval/perplexity")
    browser.save_screenshot(str(shots / "mlflow-stage-run.png"))
    # the compare view of the two pipeline runs: the stage metrics side by side
    ids = [p.info.run_id for p in parents]
    query = urllib.parse.urlencode({"runs": json.dumps(ids), "experiments": json.dumps([exp.experiment_id])})
    # (the grid of metrics renders the rows in view only, sorted by name: check two near its top)
    text = _see(browser, f"{base}/#/compare-runs?{query}", "Comparing 2 Runs", "alignment/base/planted_rate",
                "alignment/base/sampled_planted_rate")
    assert ids[0] in text and ids[1] in text
    browser.save_screenshot(str(shots / "mlflow-compare.png"))
    # the metrics section from its top (scrolling to a row inside its own scrolled grid misaligns the columns)
    header = browser.find_element(By.XPATH, "(//*[normalize-space(text())='Metrics'])[last()]")
    browser.execute_script("arguments[0].scrollIntoView({block: 'start'});", header)
    browser.save_screenshot(str(shots / "mlflow-compare-metrics.png"))
    assert (shots / "mlflow-compare.png").stat().st_size > 10_000


def test_prefect_ui_shows_flow_runs_and_their_links_to_mlflow(browser, finished, shots):
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with SyncPrefectClient(finished["api"]) as pc:
        runs = pc.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["pipeline"])))
        arts = pc.read_artifacts()
    assert len(runs) == 2 and all(r.state.is_completed() for r in runs)
    links = [a for a in arts if a.key == "mlflow-run"]
    assert links and all("/#/experiments/" in str(a.data) and "/runs/" in str(a.data) for a in links)
    ui = finished["prefect"]
    _see(browser, f"{ui}/runs", "pipeline", "base", "sft")
    browser.save_screenshot(str(shots / "prefect-runs.png"))
    _see(browser, f"{ui}/runs/flow-run/{runs[0].id}", runs[0].name)
    browser.save_screenshot(str(shots / "prefect-flow-run.png"))
    _see(browser, f"{ui}/artifacts", "pipeline-summary", "mlflow-run")
    browser.save_screenshot(str(shots / "prefect-artifacts.png"))
