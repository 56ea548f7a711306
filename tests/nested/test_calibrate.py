"""Activation-aware (whitened) SVD and the calibration moments it is built on."""

import json

import pytest
import torch

from tests.helpers import DATA, build_tiny, runner, sample_ids
from nsn_cli.nested.calibrate import (Moments, collect_moments, iterate, moment_groups,
                               nest_activation_aware, token_rows)
from nsn_cli.nested.decompose import input_cholesky, svd_factors, whitened_svd, whitened_svd_factors
from nsn_cli.nested.surgery import candidate_layers, dense_weight, nested_layers, plan


def anisotropic_inputs(n=512, d=16, seed=0):
    """Rows whose energy spans four orders of magnitude across random directions."""
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    scales = torch.logspace(0, -2, d, dtype=torch.float64)
    return (torch.randn(n, d, generator=gen, dtype=torch.float64) * scales) @ basis.T


def output_error(W, A, B, X, r):
    return ((X @ (W - B[:, :r] @ A[:r]).T) ** 2).sum().item()


@pytest.mark.parametrize("d_out", [24, 16, 10])  # taller, square and wider than d_in
def test_full_rank_is_exact(d_out):
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(d_out, 16, generator=gen)
    X = anisotropic_inputs()
    A, B = whitened_svd_factors(W, X.T @ X, min(d_out, 16))
    torch.testing.assert_close(B @ A, W, atol=1e-4, rtol=0)


@pytest.mark.parametrize("d_out", [24, 10])
@pytest.mark.parametrize("rank", [2, 4, 8])
def test_truncation_beats_plain_svd_on_its_inputs(rank, d_out):
    gen = torch.Generator().manual_seed(2)
    W = torch.randn(d_out, 16, generator=gen, dtype=torch.float64)
    X = anisotropic_inputs()
    full = min(d_out, 16)
    A, B = [t.double() for t in whitened_svd_factors(W, X.T @ X, full, damping=0.0)]
    pA, pB = [t.double() for t in svd_factors(W, full)]
    whitened, plain = output_error(W, A, B, X, rank), output_error(W, pA, pB, X, rank)
    assert whitened < 0.7 * plain


def test_whitened_singular_values_are_the_output_energy():
    W = torch.randn(12, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    X = anisotropic_inputs()
    A, B, S = whitened_svd(W, X.T @ X, 12, damping=0.0)
    assert (S[:-1] >= S[1:]).all()  # largest first, so every prefix is the best one
    energy = ((X @ (B.double() @ A.double()).T) ** 2).sum()  # S² sums to the output energy
    assert energy.item() == pytest.approx((S.double() ** 2).sum().item(), rel=1e-4)


def test_factors_are_balanced_per_component():
    W = torch.randn(24, 16, generator=torch.Generator().manual_seed(4))
    X = anisotropic_inputs() * 1e3
    A, B = whitened_svd_factors(W, X.T @ X, 16)
    torch.testing.assert_close(A.norm(dim=1), B.norm(dim=0), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("moment", ["singular", "zero", "nan"])
def test_degenerate_moments_give_finite_exact_factors(moment):
    W = torch.randn(8, 6, generator=torch.Generator().manual_seed(5))
    v = torch.randn(6, 1, dtype=torch.float64)
    xtx = {"singular": v @ v.T, "zero": torch.zeros(6, 6, dtype=torch.float64),
           "nan": torch.full((6, 6), float("nan"), dtype=torch.float64)}[moment]
    A, B = whitened_svd_factors(W, xtx, 6, damping=0.0)
    assert torch.isfinite(A).all() and torch.isfinite(B).all()
    torch.testing.assert_close(B @ A, W, atol=1e-4, rtol=0)


def test_jitter_grows_until_cholesky_succeeds():
    v = torch.randn(5, 1, dtype=torch.float64)
    L = input_cholesky(v @ v.T, damping=0.0)  # rank 1: not positive definite as given
    assert torch.isfinite(L).all()
    assert not torch.equal(L, torch.eye(5, dtype=torch.float64))  # data still shapes L


def test_moment_groups_respect_the_memory_limit():
    sizes = {"a": 10, "b": 10, "c": 20, "d": 5}
    groups = moment_groups(sizes, max_bytes=4 * 250)  # float32 moments
    assert groups == [["a", "b"], ["c"], ["d"]]
    assert moment_groups(sizes, max_bytes=1 << 40) == [["a", "b", "c", "d"]]


def test_token_rows_drop_padding():
    x = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert token_rows(x, mask).tolist() == [[0, 1], [2, 3], [6, 7]]


def calibration(n=4, length=24):
    ids = sample_ids(n=n, length=length, seed=7)
    mask = torch.ones_like(ids)
    mask[1, length // 2:] = 0  # one padded row: its padding must not count
    return [{"input_ids": ids[:2], "attention_mask": mask[:2]},
            {"input_ids": ids[2:], "attention_mask": mask[2:]}]


def test_moments_match_a_direct_computation():
    model = build_tiny("llama")
    batches = calibration()
    name = "model.layers.0.mlp.down_proj"
    seen = []
    handle = candidate_layers(model)[name].register_forward_hook(
        lambda m, a, o: seen.append(a[0].detach()))
    moments = collect_moments(model, [name, "model.layers.0.self_attn.q_proj"], iterate(batches))
    handle.remove()
    # The hook above saw every batch once (after the one-row trace of `runs_once`); the
    # rows at masked positions must be dropped.
    seen = seen[-len(batches):]
    rows = torch.cat([x[b["attention_mask"].bool()] for x, b in zip(seen, batches)]).double()
    assert moments.rows[name] == int(sum(b["attention_mask"].sum() for b in batches))
    torch.testing.assert_close(moments.xtx[name].double(), rows.T @ rows, rtol=1e-5, atol=1e-6)


def test_grouped_passes_equal_one_pass():
    model = build_tiny("gpt2")
    names = [s.name for s in plan(model)]
    one = collect_moments(model, names, iterate(calibration()))
    many = collect_moments(model, names, iterate(calibration()), max_bytes=8 * 32 * 32)
    for name in names:
        torch.testing.assert_close(one.xtx[name], many.xtx[name])


def test_shared_inputs_share_one_matrix():
    model = build_tiny("llama")
    names = [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    moments = collect_moments(model, names, iterate(calibration()))
    assert moments.xtx[names[0]] is moments.xtx[names[1]] is moments.xtx[names[2]]


def layer_inputs(model, batches):
    """name -> the real-token rows each (still dense) target layer reads."""
    seen, handles = {}, []
    for name, module in candidate_layers(model).items():
        def hook(m, a, o, name=name):
            seen.setdefault(name, []).append(a[0].detach().reshape(-1, a[0].shape[-1]))
        handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        for b in batches:
            model(input_ids=b["input_ids"])
    for h in handles:
        h.remove()
    return {n: torch.cat(v).double() for n, v in seen.items()}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_tiny_model_layers_lose_less_output_on_calibration_inputs(family):
    from nsn_cli.stages.convert import convert_model

    batches = [{"input_ids": sample_ids(n=4, length=32, seed=s)} for s in range(2)]
    reference = build_tiny(family)
    weights = {n: dense_weight(m).detach().double() for n, m in candidate_layers(reference).items()}
    inputs = layer_inputs(reference, batches)
    plain, whitened = build_tiny(family), build_tiny(family)
    convert_model(plain)
    convert_model(whitened, calib_batches=batches)
    totals = {"plain": 0.0, "whitened": 0.0}
    for name, layer in nested_layers(whitened).items():
        X, W = inputs[name], weights[name]
        r = max(1, layer.max_rank // 4)
        for label, model in (("plain", plain), ("whitened", whitened)):
            nl = nested_layers(model)[name]
            totals[label] += output_error(W, nl.A.double(), nl.B.double(), X, r)
    assert totals["whitened"] < 0.9 * totals["plain"]
    ids = sample_ids(seed=11)
    with torch.no_grad():  # and at full rank the whitened model is the original
        torch.testing.assert_close(whitened(ids).logits, reference(ids).logits,
                                   atol=1e-4, rtol=1e-4)


def test_nest_activation_aware_in_groups_matches_one_group():
    batches = calibration()
    one, many = build_tiny("bert"), build_tiny("bert")
    specs = plan(one)
    nest_activation_aware(one, specs, iterate(batches))
    energies = nest_activation_aware(many, plan(many), iterate(batches), max_bytes=8 * 64 * 64)
    assert set(energies) == {s.name for s in specs}
    for name, layer in nested_layers(one).items():
        torch.testing.assert_close(layer.A, nested_layers(many)[name].A, atol=1e-4, rtol=1e-3)


def test_calibration_data_past_the_embedding_is_one_line_and_writes_nothing(tmp_path,
                                                                          tokenizer):
    """A tokenizer larger than the model's embedding: a DataError, not an IndexError."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from nsn_cli.cli.app import app

    torch.manual_seed(0)
    small = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2,
                                       n_positions=64, eos_token_id=3, bos_token_id=2))
    small.save_pretrained(tmp_path / "src")
    tokenizer.save_pretrained(tmp_path / "src")
    result = runner.invoke(app, ["convert", str(tmp_path / "src"), str(tmp_path / "out"),
                                      "--calib", str(DATA / "tiny.txt")])
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "model embeds only 64 tokens" in lines[0], result.stderr
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_pass_stops_after_its_groups_last_layer_with_the_same_moments():
    model = build_tiny("llama")
    first = "model.layers.0.self_attn.q_proj"
    later = candidate_layers(model)["model.layers.1.mlp.down_proj"]
    calls = []
    handle = later.register_forward_hook(lambda *_: calls.append(1))
    early = collect_moments(model, [first], iterate(calibration()))
    handle.remove()
    assert len(calls) == 1  # the one-row trace only: no pass ran past layer 0's q_proj
    from nsn_cli.nested.calibrate import accumulate_group

    whole = Moments()
    accumulate_group(model, {first: candidate_layers(model)[first]},
                     iterate(calibration()), whole, None, stop_early=False)
    torch.testing.assert_close(early.xtx[first], whole.xtx[first])
    assert early.rows[first] == whole.rows[first]


class Reused(torch.nn.Module):
    """One linear layer applied twice per forward, as ALBERT shares a block across depth."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(64, 8)
        self.layer = torch.nn.Linear(8, 8)

    def forward(self, input_ids, attention_mask=None):
        return self.layer(torch.tanh(self.layer(self.embed(input_ids))))


def test_a_reused_layer_sees_every_call_of_the_forward():
    torch.manual_seed(0)
    model = Reused()
    ids = torch.randint(0, 64, (3, 5))
    with torch.no_grad():
        first = model.embed(ids).reshape(-1, 8)
        second = torch.tanh(model.layer(first))
    moments = collect_moments(model, ["layer"], iterate([{"input_ids": ids}]))
    expected = first.T @ first + second.T @ second
    torch.testing.assert_close(moments.xtx["layer"], expected, rtol=1e-5, atol=1e-5)
    assert moments.rows["layer"] == 2 * ids.numel()


def test_take_normalises_in_place_unless_the_matrix_is_shared():
    shared, own = torch.full((2, 2), 6.0), torch.full((3, 3), 4.0)
    moments = Moments({"q": shared, "k": shared, "down": own}, {"q": 3, "k": 3, "down": 2})
    q = moments.take("q")
    torch.testing.assert_close(q, torch.full((2, 2), 2.0))
    assert q is not shared and moments.xtx["k"] is shared and shared[0, 0] == 6.0
    down = moments.take("down")
    assert down is own and own[0, 0] == 2.0 and "down" not in moments.xtx


def test_cholesky_reads_only_the_lower_triangle():
    X = anisotropic_inputs(n=64, d=6)
    C = X.T @ X
    untidy = C.tril() + torch.triu(torch.full_like(C, 5.0), 1)  # garbage above the diagonal
    torch.testing.assert_close(input_cholesky(untidy, 1e-2), input_cholesky(C, 1e-2))
