"""MultiTermLoss: the weighted sum, the kept per-term tensors and every bad input."""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch

from lightning_pinn import MultiTermLoss
from lightning_pinn.loss import term_loss


def _residual(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, requires_grad=True)


def test_weighted_sum_of_mean_squares() -> None:
    loss = MultiTermLoss(pde=2.0, ic=0.5)
    r_pde, r_ic = _residual(10, 1), _residual(3)
    total = loss(pde=r_pde, ic=r_ic)
    expected = 2.0 * r_pde.pow(2).mean() + 0.5 * r_ic.pow(2).mean()
    assert torch.allclose(total, expected)
    assert set(loss.last_losses) == {"pde", "ic"}
    assert loss.last_residuals["pde"] is r_pde
    assert loss.last_losses["ic"].requires_grad


def test_zero_dim_tensor_is_an_already_reduced_loss() -> None:
    loss = MultiTermLoss(data=1.0, pde=3.0)
    data_loss = _residual(4).abs().mean()
    r = _residual(5)
    total = loss(data=data_loss, pde=r)
    assert torch.allclose(total, data_loss + 3.0 * r.pow(2).mean())


def test_weights_property_and_set_weights() -> None:
    loss = MultiTermLoss(pde=1.0, ic=10.0)
    assert loss.weights == {"pde": 1.0, "ic": 10.0}
    assert loss.term_names == ("pde", "ic")
    loss.set_weights({"ic": 100.0})
    assert loss.weights == {"pde": 1.0, "ic": 100.0}
    loss.set_weights(torch.tensor([3.0, 4.0]))
    assert loss.weights == {"pde": 3.0, "ic": 4.0}


def test_weights_are_buffers_in_the_state_dict() -> None:
    loss = MultiTermLoss(pde=1.0, ic=10.0)
    loss.set_weights({"ic": 42.0})
    restored = MultiTermLoss(pde=1.0, ic=1.0)
    restored.load_state_dict(loss.state_dict())
    assert restored.weights == {"pde": 1.0, "ic": 42.0}
    assert "lambdas" in dict(loss.named_buffers())


def test_checkpoint_with_other_terms_is_refused() -> None:
    saved = MultiTermLoss(pde=1.0, bc=2.0).state_dict()
    with pytest.raises(ValueError, match=r"terms \('pde', 'bc'\).*\('pde', 'ic'\)"):
        MultiTermLoss(pde=1.0, ic=1.0).load_state_dict(saved)


def test_checkpoint_with_the_same_terms_in_another_order_loads_each_weight_by_name() -> None:
    source = MultiTermLoss(pde=1.0, bc=2.0, ic=3.0)
    saved = source.state_dict()
    target = MultiTermLoss(ic=0.0, pde=0.0, bc=0.0)
    target.load_state_dict(saved)
    assert target.weights == {"ic": 3.0, "pde": 1.0, "bc": 2.0}
    assert saved["lambdas"].tolist() == [1.0, 2.0, 3.0], "the caller's state dict is not changed"
    wrapped = torch.nn.Module()  # nested, as in a LightningModule checkpoint
    wrapped.criterion = MultiTermLoss(bc=0.0, ic=0.0, pde=0.0)
    wrapped.load_state_dict({f"criterion.{key}": value for key, value in saved.items()})
    assert wrapped.criterion.weights == {"bc": 2.0, "ic": 3.0, "pde": 1.0}


def test_complex_residual_uses_squared_modulus() -> None:
    r = torch.randn(6, dtype=torch.complex64, requires_grad=True)
    assert torch.allclose(term_loss(r), r.abs().pow(2).mean())


def test_low_precision_residual_is_reduced_in_float32() -> None:
    r = torch.full((1000,), 1e-3, dtype=torch.bfloat16, requires_grad=True)
    assert term_loss(r).dtype == torch.float32
    # float16 squares overflow above ~256 and flush to 0 below ~2e-4: square in float32
    big = torch.full((8,), 300.0, dtype=torch.float16)
    small = torch.full((8,), 1e-4, dtype=torch.float16)
    assert term_loss(big).item() == pytest.approx(9e4, rel=1e-3)
    assert term_loss(small).item() > 0
    assert term_loss(small).item() == pytest.approx(small.float().square().mean().item(), rel=1e-6)


# ------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf, -math.inf])
def test_bad_initial_weight(value: float) -> None:
    with pytest.raises(ValueError, match="weight of term 'ic'"):
        MultiTermLoss(pde=1.0, ic=value)


def test_non_numeric_weight() -> None:
    with pytest.raises(TypeError, match="term 'ic' must be a number"):
        MultiTermLoss(pde=1.0, ic="big")  # type: ignore[arg-type]


def test_no_terms() -> None:
    with pytest.raises(ValueError, match="at least one term"):
        MultiTermLoss()


def test_unknown_term_in_forward() -> None:
    loss = MultiTermLoss(pde=1.0, ic=1.0)
    with pytest.raises(ValueError, match=r"unknown term\(s\) 'bc'.*MultiTermLoss\(\.\.\., bc=1.0\)"):
        loss(pde=_residual(3), ic=_residual(2), bc=_residual(2))


def test_missing_term_in_forward() -> None:
    loss = MultiTermLoss(pde=1.0, ic=1.0)
    with pytest.raises(ValueError, match=r"missing term\(s\) 'ic'.*or None where the term is absent.*ic=None"):
        loss(pde=_residual(3))


def test_residual_without_grad() -> None:
    loss = MultiTermLoss(pde=1.0, ic=1.0)
    with pytest.raises(ValueError, match=r"no term requires grad \(terms 'pde', 'ic'\)"):
        loss(pde=torch.randn(3), ic=torch.randn(2))
    with pytest.raises(ValueError, match=r"no term requires grad \(term 'pde'\).*It was computed.*compute it from"):
        loss(pde=torch.randn(3), ic=None)
    # beside a term that trains too: an error naming it, its causes and the fix for a deliberate freeze
    for ic in (torch.randn(2), _residual(2).detach()):
        with pytest.raises(ValueError, match=r"term 'ic' does not require grad.*detached.*frozen parameters.*pass ic=None"):
            loss(pde=_residual(3), ic=ic)
    loss3 = MultiTermLoss(pde=1.0, ic=1.0, data=1.0)
    with pytest.raises(
        ValueError, match=r"terms 'ic', 'data' do not require grad, so they.*They were.*depend only.*pass ic=None, data=None"
    ):
        loss3(pde=_residual(3), ic=torch.randn(2), data=torch.randn(4))
    with torch.no_grad():
        computed_without_grad = _residual(2) * 1.0
    with pytest.raises(ValueError, match=r"term 'ic' does not require grad.*torch.no_grad\(\)"):
        loss(pde=_residual(3), ic=computed_without_grad)
    assert loss(pde=_residual(3), ic=None).requires_grad  # absent this step: fine


def test_residual_without_grad_is_fine_when_grad_is_disabled() -> None:
    loss = MultiTermLoss(pde=1.0, ic=1.0)
    with torch.no_grad():
        total = loss(pde=torch.ones(3), ic=torch.zeros(2))
    assert total.item() == pytest.approx(1.0)


def test_integer_residual() -> None:
    loss = MultiTermLoss(pde=1.0)
    with pytest.raises(TypeError, match="term 'pde' has dtype torch.int64"):
        loss(pde=torch.ones(3, dtype=torch.long))


def test_non_tensor_residual() -> None:
    loss = MultiTermLoss(pde=1.0)
    with pytest.raises(TypeError, match="term 'pde' must be a torch.Tensor"):
        loss(pde=[1.0, 2.0])  # type: ignore[arg-type]


def test_empty_residual() -> None:
    loss = MultiTermLoss(pde=1.0, bc=1.0)
    with pytest.raises(ValueError, match="term 'bc' is an empty tensor"):
        loss(pde=_residual(3), bc=torch.zeros(0, requires_grad=True))


@pytest.mark.parametrize("value", [-2.0, math.nan])
def test_set_weights_rejects_bad_values(value: float) -> None:
    loss = MultiTermLoss(pde=1.0, ic=1.0)
    with pytest.raises(ValueError, match="term 'ic'"):
        loss.set_weights({"ic": value})
    assert loss.weights == {"pde": 1.0, "ic": 1.0}


def test_set_weights_tensor_path_checks_every_value() -> None:
    loss = MultiTermLoss(pde=1.0, ic=1.0)
    with pytest.raises(ValueError, match="term 'ic'"):
        loss.set_weights(torch.tensor([2.0, float("nan")]))
    with pytest.raises(ValueError, match="term 'pde'"):
        loss.set_weights(torch.tensor([-1.0, 2.0]))
    with pytest.raises(TypeError, match="must be real"):
        loss.set_weights(torch.tensor([1.0, 2.0], dtype=torch.complex64))
    with pytest.raises(TypeError, match=r"must be real numbers, got a torch.bool tensor .*torch.tensor\(\[1.0, 1.0\]\)"):
        loss.set_weights(torch.tensor([True, True]))  # refused, as True is in the dict form
    assert loss.weights == {"pde": 1.0, "ic": 1.0}
    loss.set_weights(torch.tensor([2.0, 3.0], requires_grad=True))
    assert loss.weights == {"pde": 2.0, "ic": 3.0} and not loss.lambdas.requires_grad


def test_set_weights_rejects_unknown_term() -> None:
    loss = MultiTermLoss(pde=1.0, ic=1.0)
    with pytest.raises(ValueError, match="unknown term"):
        loss.set_weights({"bc": 1.0})


# ------------------------------------------------------------------ misuse found by new-user probing
def test_weights_a_float32_buffer_cannot_hold_are_refused() -> None:
    with pytest.raises(ValueError, match=r"weight of term 'ic' is 1e\+39, which a torch.float32 weight buffer stores as inf"):
        MultiTermLoss(pde=1.0, ic=1e39)
    loss = MultiTermLoss(pde=1.0, ic=1.0)
    with pytest.raises(ValueError, match="stores as inf"):
        loss.set_weights({"ic": 1e39})
    with pytest.raises(ValueError, match="stores as inf"):
        loss.set_weights(torch.tensor([1.0, 1e39], dtype=torch.float64))
    assert loss.weights == {"pde": 1.0, "ic": 1.0}
    loss.double()
    loss.set_weights({"ic": 1e39})  # a float64 buffer holds it
    assert loss.weights["ic"] == 1e39


def test_clear_errors_for_positional_arguments_and_set_weights_types() -> None:
    import numpy as np

    with pytest.raises(TypeError, match=r"takes the terms by keyword.*MultiTermLoss\(pde=1.0, ic=1.0\)"):
        MultiTermLoss(1.0, 2.0)
    loss = MultiTermLoss(pde=1.0, ic=np.float32(2.0))  # numpy scalars are numbers
    assert loss.weights == {"pde": 1.0, "ic": 2.0}
    r = torch.ones(3, requires_grad=True)
    with pytest.raises(TypeError, match=r"takes the residuals by keyword, e.g. criterion\(pde=r_pde, ic=r_ic\)"):
        loss(r, r)
    with pytest.raises(TypeError, match=r"set_weights: pass a dict \{term: weight\}.*got list"):
        loss.set_weights([1.0, 2.0])  # type: ignore[arg-type]


def test_zero_dim_terms_complex_refused_negative_warned_once() -> None:
    loss = MultiTermLoss(pde=1.0, ic=1.0)
    r = torch.ones(4, requires_grad=True)
    with pytest.raises(TypeError, match="term 'ic' is a 0-dim complex tensor"):
        loss(pde=r, ic=torch.tensor(1 + 1j, requires_grad=True))
    single = torch.tensor(-0.5, requires_grad=True)  # a one-point residual squeezed to 0-dim
    with pytest.warns(UserWarning, match=r"term 'ic' was given as a 0-dim tensor.*negative.*r.reshape\(1\)"):
        loss(pde=r, ic=single)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss(pde=r, ic=single)  # once per term: no .item() on later steps


def test_a_refused_checkpoint_leaves_the_weights_alone() -> None:
    source = MultiTermLoss(pde=1.0, ic=500.0)
    target = MultiTermLoss(pde=2.0, bc=3.0)
    with pytest.raises(ValueError, match=r"checkpoint holds weights for terms \('pde', 'ic'\)"):
        target.load_state_dict(source.state_dict())
    assert target.weights == {"pde": 2.0, "bc": 3.0}


class _NetWithLoss(torch.nn.Module):
    """A network holding a MultiTermLoss, as a user's model does (for state-dict tests)."""

    def __init__(self, **weights: float) -> None:
        super().__init__()
        self.net = torch.nn.Linear(1, 1)
        self.criterion = MultiTermLoss(**weights)


def test_a_checkpoint_with_other_terms_can_be_loaded_without_its_weights_as_the_error_says() -> None:
    """Fine-tuning pde+ic into pde+ic+data: the error names the keys to drop; the rest then loads."""

    saved, target = _NetWithLoss(pde=2.0, ic=300.0), _NetWithLoss(pde=1.0, data=5.0, ic=1.0)
    state = saved.state_dict()
    with pytest.raises(ValueError, match=r"remove 'criterion.lambdas' and 'criterion._extra_state' .* strict=False"):
        target.load_state_dict(state)
    assert target.criterion.weights == {"pde": 1.0, "data": 5.0, "ic": 1.0}  # refused: untouched
    state = {key: value for key, value in state.items() if key not in ("criterion.lambdas", "criterion._extra_state")}
    target.load_state_dict(state, strict=False)
    assert torch.equal(target.net.weight, saved.net.weight)
    assert target.criterion.weights == {"pde": 1.0, "data": 5.0, "ic": 1.0}


def test_every_state_dict_value_is_a_tensor_and_a_cloned_copy_loads_by_term_name() -> None:
    """Keeping the best weights with ``{k: v.clone() ...}``, safetensors files and EMA helpers need tensors only."""

    saved = _NetWithLoss(pde=2.0, ic=300.0, data=5.0)
    state = {key: value.detach().clone() for key, value in saved.state_dict().items()}
    assert all(isinstance(value, torch.Tensor) for value in state.values())
    reordered = _NetWithLoss(ic=1.0, data=1.0, pde=1.0)
    reordered.load_state_dict(state)
    assert reordered.criterion.weights == {"ic": 300.0, "data": 5.0, "pde": 2.0}
    with pytest.raises(ValueError, match=r"checkpoint holds weights for terms \('pde', 'ic', 'data'\)"):
        _NetWithLoss(pde=1.0, bc=1.0, data=1.0).load_state_dict(state)
    unicode_names = _NetWithLoss(λ_bc=3.0, ü=4.0)
    copy = _NetWithLoss(ü=1.0, λ_bc=1.0)
    copy.load_state_dict(unicode_names.state_dict())
    assert copy.criterion.weights == {"ü": 4.0, "λ_bc": 3.0}


def test_checkpoints_that_recorded_the_term_names_as_a_dict_still_load_and_are_checked() -> None:
    loss = MultiTermLoss(pde=1.0, ic=1.0)
    old_format = {"lambdas": torch.tensor([300.0, 2.0]), "_extra_state": {"terms": ["ic", "pde"]}}
    loss.load_state_dict(old_format)
    assert loss.weights == {"pde": 2.0, "ic": 300.0}
    with pytest.raises(ValueError, match=r"checkpoint holds weights for terms \('ic', 'bc'\)"):
        loss.load_state_dict({"lambdas": torch.tensor([1.0, 1.0]), "_extra_state": {"terms": ["ic", "bc"]}})


@pytest.mark.parametrize(
    "record",
    [
        torch.tensor([255, 0, 7], dtype=torch.uint8),  # not UTF-8
        torch.tensor(list(b'["pde", "bc"'), dtype=torch.uint8),  # truncated JSON
        torch.tensor(list(b'{"terms": 1}'), dtype=torch.uint8),  # JSON, not a list of names
        torch.tensor(list(b"[1, 2]"), dtype=torch.uint8),
        torch.tensor([1.0, 2.0]),  # not a uint8 tensor
        {"names": ["pde", "bc"]},  # a dict without the old form's "terms"
        None,
    ],
    ids=["not-utf8", "truncated", "object", "numbers", "float-tensor", "dict", "none"],
)
def test_an_unreadable_term_name_record_is_refused_and_lambda_is_kept(record: Any) -> None:
    """Such a record used to be taken as no record at all: the weights loaded by position, swapped."""
    state = dict(MultiTermLoss(pde=1.0, bc=2.0).state_dict(), _extra_state=record)
    loss = MultiTermLoss(bc=5.0, pde=6.0)
    with pytest.raises(ValueError, match=r"'_extra_state' \(the term names .*\) cannot be read.*set_weights"):
        loss.load_state_dict(state)
    assert loss.weights == {"bc": 5.0, "pde": 6.0}


def test_weights_loaded_without_their_term_names_are_taken_by_position_with_a_warning() -> None:
    """A state dict filtered down to its floating-point tensors, loaded with strict=False."""
    floats = {k: v for k, v in MultiTermLoss(pde=1.0, bc=2.0).state_dict().items() if v.is_floating_point()}
    assert "_extra_state" not in floats
    loss = MultiTermLoss(bc=5.0, pde=6.0)
    with pytest.warns(UserWarning, match=r"not '_extra_state' \(the term names\), so each weight is loaded by its position"):
        loss.load_state_dict(floats, strict=False)
    assert loss.weights == {"bc": 1.0, "pde": 2.0}  # by position, as the warning says
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # equal weights: the order does not matter, nothing to say
        MultiTermLoss(bc=5.0, pde=6.0).load_state_dict({"lambdas": torch.tensor([3.0, 3.0])}, strict=False)


@pytest.mark.parametrize("name", ["bc/left", "u_vs_v", "vs_b", "a_vs", "vs", "b c", ""])
def test_term_names_that_would_make_tags_ambiguous_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match=r"term name .* cannot be used in the logged tags.*'vs' word"):
        MultiTermLoss(pde=1.0, **{name: 1.0})


def test_term_names_with_vs_inside_a_word_are_fine() -> None:
    assert MultiTermLoss(canvas=1.0, vsx=1.0, obs_vsn=1.0).term_names == ("canvas", "vsx", "obs_vsn")


@pytest.mark.parametrize("name", ["a\x00", "b\u200b", "c\u200d", "tab\x7f"])
def test_term_names_with_invisible_characters_are_refused(name: str) -> None:
    """A NUL or zero-width space beside a visible 'b' gave alarms and reports naming two terms that look alike."""
    with pytest.raises(ValueError, match=r"holds an invisible character \(U\+"):
        MultiTermLoss(b=1.0, **{name: 1.0})


def test_two_unicode_spellings_of_one_name_are_refused_and_other_scripts_are_fine() -> None:
    import unicodedata

    composed, decomposed = unicodedata.normalize("NFC", "é"), unicodedata.normalize("NFD", "é")
    assert composed != decomposed
    with pytest.raises(ValueError, match=r"same text in two Unicode spellings"):
        MultiTermLoss(**{composed: 1.0, decomposed: 1.0})
    assert MultiTermLoss(**{"λ_bc": 1.0, "ü": 1.0, decomposed: 1.0}).term_names == ("λ_bc", "ü", decomposed)
    # joiners between two characters are part of real spellings (Persian, Devanagari, emoji sequences)
    joined = ["می\u200cخواهم", "क्\u200dष", "👨\u200d👩\u200d👧"]
    assert MultiTermLoss(**dict.fromkeys(joined, 1.0)).term_names == tuple(joined)


def test_a_term_named_self_is_refused_with_the_fix() -> None:
    from lightning_pinn import PINNModule

    with pytest.raises(ValueError, match=r"term name 'self' .* rename the term, e\.g\. 'self_consistency'"):
        MultiTermLoss(self=1.0, pde=1.0)
    with pytest.raises(ValueError, match=r"term name 'self'"):
        PINNModule(weights={"self": 1.0, "pde": 1.0})
    assert MultiTermLoss(self_consistency=1.0).term_names == ("self_consistency",)
