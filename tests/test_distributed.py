"""Lightning's DDP strategy on 2 CPU processes (gloo): reduced norms, identical weights, no hangs."""

from __future__ import annotations

import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from ddp_helpers import DumpPerStep, SplitPoisson, ToggledGroupsLoggedOnOneRank
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.strategies import DDPStrategy
from torch.multiprocessing.spawn import ProcessExitedException

from lightning_pinn.callbacks import GradientNormMonitor, GradNormBalancer, NTKBalancer, ReLoBRaLoBalancer

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

STEPS = 4


def _fit(
    model: pl.LightningModule, folder: Path, devices: int, balancer: pl.Callback | None = None, logger: Any = False, **ddp: Any
) -> None:
    strategy: Any = DDPStrategy(start_method="spawn", timeout=timedelta(seconds=60), **ddp) if devices > 1 else "auto"
    trainer = pl.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[
            GradientNormMonitor(every_n_steps=1, verbose=False, report=logger is not False),
            balancer or GradNormBalancer(every_n_steps=1),
            DumpPerStep(str(folder)),
        ],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            trainer.fit(model)
        except ProcessExitedException as error:
            # gloo sometimes aborts a worker while the interpreter exits ("terminate called without
            # an active exception"), also with no callback of ours: accept that only if every rank
            # finished the fit and wrote all its data.
            finished = all((folder / f"rank{rank}_done").exists() for rank in range(devices))
            if not finished or "SIGABRT" not in str(error):
                raise


def _load(folder: Path, rank: int, step: int) -> dict[str, Any]:
    return torch.load(folder / f"rank{rank}_step{step}.pt", weights_only=False)


def _fit_ddp_and_one_process(tmp_path: Path, model: SplitPoisson) -> None:
    """Fit ``model`` on 2 ranks (into ``ddp/``) and a copy of its start on one process (``one/``)."""
    single = SplitPoisson()
    single.load_state_dict(model.state_dict())
    (tmp_path / "ddp").mkdir()
    (tmp_path / "one").mkdir()
    _fit(model, tmp_path / "ddp", devices=2)
    _fit(single, tmp_path / "one", devices=1)


def test_ddp_norms_equal_the_union_and_weights_are_identical(tmp_path: Path) -> None:
    torch.manual_seed(0)
    _fit_ddp_and_one_process(tmp_path, SplitPoisson())
    for step in range(STEPS):
        rank0, rank1, reference = _load(tmp_path / "ddp", 0, step), _load(tmp_path / "ddp", 1, step), _load(tmp_path / "one", 0, step)
        assert torch.equal(rank0["weights"], rank1["weights"]), f"λ differ across ranks after step {step}"
        assert rank0["norms"] == rank1["norms"]
        # the reduced per-term norms are those of one process on the union of the ranks' points
        assert rank0["norms"] == pytest.approx(reference["norms"], rel=1e-4)
        assert rank0["losses"] == pytest.approx(reference["losses"], rel=1e-4)
        assert rank0["weights"].tolist() == pytest.approx(reference["weights"].tolist(), rel=1e-4)


def test_ddp_with_different_batches_per_rank_does_not_hang(tmp_path: Path) -> None:
    torch.manual_seed(0)
    _fit(SplitPoisson(uneven=True), tmp_path, devices=2)  # the strategy's 60 s timeout turns a hang into an error
    for step in range(STEPS):
        rank0, rank1 = _load(tmp_path, 0, step), _load(tmp_path, 1, step)
        assert torch.equal(rank0["weights"], rank1["weights"])
        assert torch.isfinite(rank0["weights"]).all()


def test_ddp_term_absent_on_one_rank_is_measured_on_the_ranks_that_have_it(tmp_path: Path) -> None:
    """'bc' is absent on rank 1 at step 1: its loss and gradient are those of the union of the
    points that have it (rank 0's), like a one-process run; the norm used to be halved."""
    torch.manual_seed(0)
    _fit_ddp_and_one_process(tmp_path, SplitPoisson(drop_bc=True))
    for step in (0, 1):  # after step 1 the fits differ: rank 1's optimizer step had no 'bc'
        ddp, reference = _load(tmp_path / "ddp", 0, step), _load(tmp_path / "one", 0, step)
        assert ddp["norms"] == pytest.approx(reference["norms"], rel=1e-4)
        assert ddp["losses"] == pytest.approx(reference["losses"], rel=1e-4)
        assert ddp["weights"].tolist() == pytest.approx(reference["weights"].tolist(), rel=1e-4)


@pytest.mark.parametrize(
    "make_balancer", [lambda: NTKBalancer(every_n_steps=1, trace_points=4), lambda: ReLoBRaLoBalancer(every_n_steps=1)]
)
def test_ddp_spawn_carries_balancers_that_hold_a_random_generator(tmp_path: Path, make_balancer: Any) -> None:
    """ddp_spawn pickles the callbacks into the new processes; a bare torch.Generator failed there."""
    torch.manual_seed(0)
    _fit(SplitPoisson(), tmp_path, devices=2, balancer=make_balancer())
    for step in range(STEPS):
        rank0, rank1 = _load(tmp_path, 0, step), _load(tmp_path, 1, step)
        assert torch.equal(rank0["weights"], rank1["weights"])
        assert torch.isfinite(rank0["weights"]).all()
    assert not torch.equal(_load(tmp_path, 0, STEPS - 1)["weights"], torch.ones(2))  # the balancer did update


def test_ddp_with_a_logger_writes_the_report_once_and_returns(tmp_path: Path) -> None:
    """The end-of-fit report reads ``trainer.log_dir``, a broadcast under DDP: read on rank 0 only,
    it left rank 1 gone and rank 0's fit crashed in ``on_fit_end`` ("Connection closed by peer")."""
    torch.manual_seed(0)
    logger = TensorBoardLogger(str(tmp_path / "logs"), name="ddp", version=0)
    _fit(SplitPoisson(), tmp_path, devices=2, logger=logger)
    assert (tmp_path / "rank0_done").exists() and (tmp_path / "rank1_done").exists()
    reports = sorted(p.name for p in (tmp_path / "logs").rglob("diagnosis.*"))
    assert reports == ["diagnosis.md", "diagnosis.png"]


def test_ddp_ranks_whose_calls_differ_reduce_tensors_of_one_shape(tmp_path: Path) -> None:
    # rank 0 alone evaluated the loss for logging before the toggled calls: its gradient layout
    # covered the coefficient on steps where no call trained it, rank 1's did not, and gloo
    # aborted on the size mismatch; the ranks now agree on the union before reducing
    _fit(ToggledGroupsLoggedOnOneRank(), tmp_path, devices=2, find_unused_parameters=True)
    steps = sorted(int(path.stem.split("step")[1]) for path in tmp_path.glob("rank0_step*.pt"))
    assert steps == [0, 2, 3]  # two optimizer steps on the second batch
    for step in steps:
        first, second = _load(tmp_path, 0, step), _load(tmp_path, 1, step)
        assert first["norms"] == second["norms"] and torch.equal(first["weights"], second["weights"])
