"""The command line's cluster paths: which runner `train` picks, and a clear non-zero exit on failure."""
import yaml
from cluster_helpers import tiny_config

import rankpm.cluster.launch as launch
from rankpm.engine.cli import main


def write_config(tmp_path):
    raw = tiny_config(tmp_path / "run").to_dict()
    raw["train"]["betas"] = list(raw["train"]["betas"])
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_workers_route_to_ray_and_a_final_failure_exits_non_zero_with_the_reason(tmp_path, monkeypatch, capsys):
    seen = {}

    def failing(cfg, *, dashboard=False, on_record=None):
        seen.update(workers=cfg.cluster.workers, dashboard=dashboard)
        raise launch.ClusterRunError("training on Ray failed after 2 worker restart(s) (cluster.max_failures=2): boom")

    monkeypatch.setattr(launch, "train_on_ray", failing)
    assert main(["train", str(write_config(tmp_path)), "--workers", "3", "--dashboard"]) == 1
    assert seen == {"workers": 3, "dashboard": True}
    assert "rankpm train: error: training on Ray failed after 2 worker restart(s)" in capsys.readouterr().err


def test_jobs_api_unreachable_is_a_clear_error(capsys):
    assert main(["jobs", "status", "raysubmit_x", "--address", "http://127.0.0.1:9"]) == 1
    assert "cannot reach the Ray Jobs API at http://127.0.0.1:9" in capsys.readouterr().err
