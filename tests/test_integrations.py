"""Arc inside real trainers: PyTorch Lightning (``ArcCallback``) and the Hugging Face Trainer
(``ArcTrainer``/``ArcTrainerCallback``), through examples/lightning_example.py and
examples/hf_example.py, on the CPU with tiny models and synthetic data (no downloads).

For each framework:

* the example recovers from an injected LR spike (an LR its scheduler does not explain: damaged
  optimizer state, rolled back; a one-step NaN loss would only skip its update): one fault
  fired, one rollback, the trainer reaches ``max_steps``, the held-out loss is finite and close
  to a fault-free run's;
* a rolled-back step changes nothing: with every batch the same, a run with an LR spike at step
  35 ends bit-identical (weights, optimizer state with Adam's step count, scheduler) to a
  fault-free run of as many updates; so the trainer's own optimizer step after a rollback and
  the scheduler step the trainer takes anyway leave no trace;
* Arc's state travels with the framework's checkpoints;
* with two DDP ranks (gloo) and the spike on rank 1 only, both ranks roll back together and end
  with identical weights;
* misuse fails with a message that says what to do.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from arc_dist import ArcConfig  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FAULT_STEP, SNAPSHOT_EVERY, STEPS = 35, 10, 80
#: a fault whose answer is a rollback (nothing explains the LR: the scheduler says otherwise)
FAULT = f"lr_spike@{FAULT_STEP}"
# it rolls back to the snapshot at step 30: that step and the 5 before it are lost
LOST = 1 + FAULT_STEP - (FAULT_STEP // SNAPSHOT_EVERY) * SNAPSHOT_EVERY
#: how far the held-out loss of the faulty run may be from the fault-free run's (relative); the
#: faulty run has 6 fewer updates
TOLERANCE = 0.15

pytestmark = pytest.mark.timeout(300)


def _example(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _exact_config() -> ArcConfig:
    return ArcConfig(snapshot_every=SNAPSHOT_EVERY, lr_backoff=1.0)


def _assert_recovered(faulty: dict, clean: dict, fired: list) -> None:
    stats = faulty["stats"]
    assert fired == [("lr_spike", FAULT_STEP, 0)]
    assert (stats["rollbacks"], stats["failures"], stats["escalations"]) == (1, 1, 0)
    assert clean["stats"]["rollbacks"] == clean["stats"]["failures"] == 0
    assert faulty["trainer_steps"] == clean["trainer_steps"] == STEPS
    assert faulty["arc_steps"] == STEPS - LOST and clean["arc_steps"] == STEPS
    assert math.isfinite(faulty["final_loss"])
    assert abs(faulty["final_loss"] - clean["final_loss"]) <= TOLERANCE * clean["final_loss"], (
        faulty["final_loss"],
        clean["final_loss"],
    )


def _assert_same_state(model_a, model_b, opt_a, opt_b, sched_a, sched_b) -> None:
    sa, sb = model_a.state_dict(), model_b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    oa, ob = opt_a.state_dict(), opt_b.state_dict()
    assert oa["state"].keys() == ob["state"].keys()
    for i in oa["state"]:
        for k, v in oa["state"][i].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(ob["state"][i][k])), (i, k)
    assert [g["lr"] for g in oa["param_groups"]] == [g["lr"] for g in ob["param_groups"]]
    assert sched_a.state_dict() == sched_b.state_dict()


# -- PyTorch Lightning ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def lightning_example():
    pytest.importorskip("lightning")
    return _example("lightning_example")


def test_lightning_example_recovers_from_a_fault(lightning_example):
    faulty = lightning_example.main(STEPS, FAULT)
    clean = lightning_example.main(STEPS, None)
    arc = faulty["callback"].arc
    _assert_recovered(faulty, clean, arc.chaos.fired)
    assert faulty["callback"].last_action.status == "healthy"


def test_lightning_rolled_back_step_leaves_no_trace(lightning_example):
    faulty = lightning_example.main(STEPS, FAULT, config=_exact_config(), same_batch=True)
    assert faulty["stats"]["rollbacks"] == 1 and faulty["arc_steps"] == STEPS - LOST
    clean = lightning_example.main(
        faulty["arc_steps"], None, config=_exact_config(), same_batch=True
    )
    a, b = faulty["callback"].arc, clean["callback"].arc
    assert a.optimizer.state_dict()["state"][0]["step"] == STEPS - LOST  # Adam's own count
    _assert_same_state(a.model, b.model, a.optimizer, b.optimizer, a.scheduler, b.scheduler)


def test_lightning_checkpoint_carries_arc_state(lightning_example, tmp_path):
    ckpt = str(tmp_path / "run.ckpt")
    first = lightning_example.main(50, FAULT, root_dir=str(tmp_path), save_to=ckpt)
    assert (first["trainer_steps"], first["arc_steps"], first["stats"]["rollbacks"]) == (
        50,
        50 - LOST,
        1,
    )
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["callbacks"]["ArcCallback"][
        "arc"
    ]
    assert saved["global_step"] == 50 - LOST and saved["stats"]["rollbacks"] == 1

    resumed = lightning_example.main(70, None, root_dir=str(tmp_path), ckpt_path=ckpt)
    assert resumed["trainer_steps"] == 70
    assert resumed["arc_steps"] == 70 - LOST  # Arc's count continued from the checkpoint
    assert resumed["stats"]["rollbacks"] == 1 and resumed["stats"]["failures"] == 1
    assert math.isfinite(resumed["final_loss"]) and resumed["final_loss"] < first["final_loss"]


def test_lightning_misuse(lightning_example):
    import lightning.pytorch as L

    from arc_dist.integrations.lightning import ArcCallback

    with pytest.raises(TypeError, match="optimizer"):
        ArcCallback(optimizer=None)

    class Manual(lightning_example.Regressor):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    data = lightning_example.make_data(64, 0)
    loader = torch.utils.data.DataLoader(data, batch_size=32)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        callbacks=[ArcCallback()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(ValueError, match="automatic optimization"):
        trainer.fit(Manual(), loader)


# -- Hugging Face Trainer ------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_example():
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    return _example("hf_example")


def test_hf_example_recovers_from_a_fault(hf_example):
    faulty = hf_example.main(STEPS, FAULT)
    clean = hf_example.main(STEPS, None)
    trainer = faulty["trainer"]
    _assert_recovered(faulty, clean, trainer.arc.chaos.fired)
    logged = [r for r in trainer.state.log_history if "arc_rollbacks" in r]
    assert logged and logged[-1]["arc_rollbacks"] == 1  # reported with the training logs
    assert trainer.arc_callback.last_action.status == "healthy"


def test_hf_rolled_back_step_leaves_no_trace(hf_example):
    steps = 60
    faulty = hf_example.main(steps, FAULT, config=_exact_config(), same_batch=True)
    assert faulty["stats"]["rollbacks"] == 1 and faulty["arc_steps"] == steps - LOST
    clean = hf_example.main(faulty["arc_steps"], None, config=_exact_config(), same_batch=True)
    a, b = faulty["trainer"].arc, clean["trainer"].arc
    assert int(a.optimizer.state_dict()["state"][0]["step"]) == steps - LOST  # AdamW's own count
    _assert_same_state(a.model, b.model, a.optimizer, b.optimizer, a.scheduler, b.scheduler)


def test_hf_checkpoint_carries_arc_state(hf_example, tmp_path):
    from arc_dist.integrations.hf import ARC_STATE_FILE

    out = str(tmp_path / "out")
    first = hf_example.main(50, FAULT, output_dir=out, save_steps=25)
    assert (first["trainer_steps"], first["arc_steps"], first["stats"]["rollbacks"]) == (
        50,
        50 - LOST,
        1,
    )
    at_25 = torch.load(os.path.join(out, "checkpoint-25", ARC_STATE_FILE), weights_only=True)
    at_50 = torch.load(os.path.join(out, "checkpoint-50", ARC_STATE_FILE), weights_only=True)
    assert (at_25["global_step"], at_25["stats"]["rollbacks"]) == (25, 0)
    assert (at_50["global_step"], at_50["stats"]["rollbacks"]) == (50 - LOST, 1)

    resumed = hf_example.main(70, None, output_dir=out, save_steps=25, resume=True)
    assert resumed["trainer_steps"] == 70
    assert resumed["arc_steps"] == 70 - LOST  # Arc's count continued from checkpoint-50
    assert resumed["stats"]["rollbacks"] == 1 and resumed["stats"]["failures"] == 1
    assert math.isfinite(resumed["final_loss"]) and resumed["final_loss"] < first["final_loss"]


def test_hf_callback_needs_the_mixin(hf_example, tmp_path):
    from transformers import Trainer, TrainingArguments

    from arc_dist.integrations.hf import ArcTrainer, ArcTrainerCallback

    with pytest.raises(TypeError, match="model"):
        ArcTrainerCallback(model=None)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=1,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
    )
    data = hf_example.Progressions(32, 0)
    plain = Trainer(
        hf_example.tiny_gpt2(), args, train_dataset=data, callbacks=[ArcTrainerCallback()]
    )
    with pytest.raises(RuntimeError, match="ArcTrainerMixin"):
        plain.train()
    with pytest.raises(ValueError, match="more than one"):
        ArcTrainer(
            hf_example.tiny_gpt2(),
            args,
            train_dataset=data,
            callbacks=[ArcTrainerCallback()],
            arc_callback=ArcTrainerCallback(),
        )


# -- two ranks (DDP over gloo) -------------------------------------------------------------


def _run_ranks(cmd: list[str], tmp_path: Path, timeout: float = 240) -> list[dict]:
    """Run a 2-process example and return its per-rank RESULT lines, rank 0 first."""
    from tests._launchproc import clean_env

    env = clean_env(tmp_path, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        cmd,
        cwd=EXAMPLES.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{cmd} did not finish in {timeout}s:\n{out[-4000:]}")
    assert proc.returncode == 0, out[-4000:]
    results = [json.loads(m) for m in re.findall(r"RESULT (\{.*?\})", out)]
    assert sorted(r["rank"] for r in results) == [0, 1], out[-4000:]
    return sorted(results, key=lambda r: r["rank"])


def _assert_ranks_recovered(results: list[dict], steps: int) -> None:
    # the spike came from rank 1 alone; both ranks rolled back together and stayed identical
    assert [r["fired"] for r in results] == [[], [["lr_spike", FAULT_STEP, 1]]]
    for r in results:
        assert (r["trainer_steps"], r["arc_steps"]) == (steps, steps - LOST)
        assert (r["rollbacks"], r["failures"]) == (1, 1)
        assert r["fast_steps"] > 0  # Arc got the DDP module: its signals rode DDP's all-reduce
        assert math.isfinite(r["final_loss"])
    assert results[0]["weights"] == results[1]["weights"]


@pytest.mark.slow
def test_lightning_ddp_two_ranks(lightning_example, tmp_path):
    steps = 60
    results = _run_ranks(
        [
            sys.executable,
            str(EXAMPLES / "lightning_example.py"),
            "--devices",
            "2",
            "--steps",
            str(steps),
            "--chaos",
            f"{FAULT}/1",
            "--json",
        ],
        tmp_path,
    )
    _assert_ranks_recovered(results, steps)


@pytest.mark.slow
def test_hf_ddp_two_ranks(hf_example, tmp_path):
    steps = 60
    results = _run_ranks(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(EXAMPLES / "hf_example.py"),
            "--steps",
            str(steps),
            "--chaos",
            f"{FAULT}/1",
            "--json",
        ],
        tmp_path,
    )
    _assert_ranks_recovered(results, steps)
