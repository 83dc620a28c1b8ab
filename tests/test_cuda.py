"""The callbacks on a CUDA device: exact norms, AMP (16-mixed with a GradScaler, bf16-mixed),
NTK traces, balancers, checkpoint and resume, TensorBoard, a balanced fit.

Skipped where no GPU is present (CI and the 2-core development machine); run on a lent GPU
machine with ``python -m pytest tests/test_cuda.py`` (see the README's "Guarantees").
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from conftest import TwoTermPoisson, flat_gradient, make_trainer
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.plugins.precision import MixedPrecision
from tb import load_events, scalar_series

from lightning_pinn.callbacks import GradientNormMonitor, GradNormBalancer, NTKBalancer
from lightning_pinn.ntk import jacobian_row_sq_norms
from lightning_pinn.problems import HarmonicOscillator

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _gpu_trainer(steps: int, callbacks: list[Any], **kwargs: Any) -> pl.Trainer:
    return make_trainer(steps, callbacks, accelerator="gpu", devices=1, **kwargs)


def _fit(model: pl.LightningModule, steps: int, callbacks: list[Any], **kwargs: Any) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _gpu_trainer(steps, callbacks, **kwargs).fit(model)
    return list(caught)


def _hand_norms(model: TwoTermPoisson) -> list[float]:
    """‖∇θ L_i‖ of each unweighted term at the model's current parameters, by autograd.grad, on the GPU."""
    model = model.cuda()
    params = [p for p in model.parameters() if p.requires_grad]
    residuals = model.residuals()
    norms = []
    for name in ("pde", "bc"):
        norms.append(torch.linalg.vector_norm(flat_gradient(residuals[name].square().mean(), params)).item())
    model.cpu()
    return norms


def _step0_norms(**trainer_kwargs: Any) -> tuple[list[float], tuple[float, ...]]:
    torch.manual_seed(0)
    model = TwoTermPoisson()
    reference = _hand_norms(model)
    monitor = GradientNormMonitor(every_n_steps=1, verbose=False, report=False)
    _fit(model, 1, [monitor], **trainer_kwargs)
    assert monitor.last_report is not None and monitor.last_measurement is not None
    assert monitor.last_measurement.gradients is not None and monitor.last_measurement.gradients.device.type == "cuda"
    return reference, monitor.last_report.norms


def test_norms_on_cuda_equal_a_hand_computation() -> None:
    reference, measured = _step0_norms()
    assert list(measured) == pytest.approx(reference, rel=1e-5)


def test_16_mixed_with_grad_scaler_gives_unscaled_norms() -> None:
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)
    reference, measured = _step0_norms(plugins=[MixedPrecision("16-mixed", "cuda", scaler=scaler)])
    assert list(measured) == pytest.approx(reference, rel=3e-2), "norms must be of the unscaled loss, not 1024x larger"


def test_16_mixed_default_scaler_skips_overflow_quietly_and_balances() -> None:
    torch.manual_seed(0)
    model = TwoTermPoisson()
    monitor = GradientNormMonitor(every_n_steps=1, verbose=False, report=False)
    balancer = GradNormBalancer(every_n_steps=1)
    caught = _fit(model, 30, [monitor, balancer], precision="16-mixed")  # Lightning's scaler starts at 2**16
    assert balancer.num_updates == monitor.diagnosis.measurements > 0
    assert not [w for w in caught if "NaN" in str(w.message) or "infinite" in str(w.message)]
    assert all(math.isfinite(v) and v > 0 for v in model.criterion.weights.values())


def test_bf16_mixed_norms_match_float32() -> None:
    reference, measured = _step0_norms(precision="bf16-mixed")
    assert list(measured) == pytest.approx(reference, rel=3e-2)


def test_ntk_traces_on_cuda_match_cpu() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(1, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)
    ).double()
    x_cpu = torch.linspace(0, 1, 300, dtype=torch.float64).reshape(-1, 1)

    def traces(device: str) -> torch.Tensor:
        model = net.to(device)
        x = x_cpu.to(device).requires_grad_(True)
        u = model(x)
        (du,) = torch.autograd.grad(u.sum(), x, create_graph=True)
        (d2u,) = torch.autograd.grad(du.sum(), x, create_graph=True)
        residual = d2u + u
        return jacobian_row_sq_norms(residual, list(model.parameters()), None, chunk_size=64).cpu()

    cpu, gpu = traces("cpu"), traces("cuda")
    assert torch.allclose(gpu, cpu, rtol=1e-9, atol=0)


def test_balancers_checkpoint_and_resume_on_cuda(tmp_path: Path) -> None:
    def callbacks() -> list[Any]:
        return [
            GradientNormMonitor(every_n_steps=5, verbose=False, report=False),
            GradNormBalancer(every_n_steps=5, terms=["bc"]),
            NTKBalancer(every_n_steps=10, terms=["pde"], trace_points=16),
        ]

    devices: list[str] = []

    class WeightDevice(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
            devices.append(pl_module.criterion.lambdas.device.type)

    torch.manual_seed(0)
    first = TwoTermPoisson()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=20)
    _fit(first, 20, [*callbacks(), checkpoint, WeightDevice()], enable_checkpointing=True)
    assert set(devices) == {"cuda"}, "the weights stay on the module's device after each update"
    saved = dict(first.criterion.weights)
    assert saved["bc"] != 1.0 and saved["pde"] != 1.0

    resumed = TwoTermPoisson()
    callbacks_b = callbacks()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = _gpu_trainer(40, [*callbacks_b, ModelCheckpoint(dirpath=tmp_path / "b")], enable_checkpointing=True)
        trainer.fit(resumed, ckpt_path=str(tmp_path / "last.ckpt"))
    assert callbacks_b[1].num_updates == 8 and callbacks_b[2].num_updates == 4, "balancer state continues from the checkpoint"
    assert callbacks_b[0].diagnosis.measurements == 8
    assert all(math.isfinite(v) and v > 0 for v in resumed.criterion.weights.values())


def test_tensorboard_tags_from_a_cuda_fit(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TwoTermPoisson()
    monitor = GradientNormMonitor(every_n_steps=1, verbose=False)
    logger = TensorBoardLogger(str(tmp_path), name="run", version=0)
    _fit(model, 12, [monitor], logger=logger, log_every_n_steps=5)
    events = load_events(tmp_path)
    assert [step for step, _ in scalar_series(events, "grad_norm/pde")] == list(range(12))
    assert (Path(logger.log_dir) / "diagnosis.png").stat().st_size > 0


def test_balanced_harmonic_fit_on_cuda_beats_unit_weights() -> None:
    torch.manual_seed(0)
    balanced = HarmonicOscillator(ic_weight=1.0, steps_per_epoch=2000)
    balancer = GradNormBalancer()
    _fit(balanced, 2000, [balancer])
    error = balanced.relative_l2_error()
    assert error < 2e-2, f"GradNormBalancer on the harmonic IVP (CUDA, 2000 steps): relative L2 {error:.3g}"
    assert balanced.criterion.weights["ic"] > 10


def test_one_optimizer_per_parameter_group_on_cuda() -> None:
    """Two toggled optimizers merge two calls into one measurement; the merge's presence mask was
    made on the CPU and met CUDA loss values in torch.where (found by review, not run then)."""
    from test_reliability import TogglingInverseProblem

    model = TogglingInverseProblem()
    monitor = GradientNormMonitor(every_n_steps=1, verbose=False, report=False)
    balancer = GradNormBalancer(every_n_steps=2)
    _fit(model, 4, [monitor, balancer])
    measurement = monitor.last_measurement
    assert measurement is not None and measurement.gradients is not None and measurement.gradients.is_cuda
    assert balancer.num_updates > 0 and all(math.isfinite(w) for w in model.criterion.weights.values())
