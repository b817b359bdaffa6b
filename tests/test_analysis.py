"""fastes.analysis: KL drift against a transformers oracle, geometry against hand-computed values on synthetic
checkpoints, interpolation endpoints against the endpoint models, report files and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_model import make_tiny_model

from fastes.analysis import cli
from fastes.analysis.geometry import cosine, stable_rank, topk_energy, update_geometry
from fastes.analysis.interpolate import alpha_grid, barrier, evaluate_point, interpolate, interpolate_params
from fastes.analysis.kl import kl_drift, kl_drift_many
from fastes.analysis.prompts import english_prompts, random_vocab_prompts, read_prompts
from fastes.analysis.report import write_report
from fastes.engine.engine import Engine
from fastes.es.tasks.base import Example
from fastes.models import load_model, save_pretrained

LETTERS = "abcdefghijklm"
pytestmark = pytest.mark.usefixtures("one_thread")


def _edited(base: Path, out: Path, edits: dict[str, torch.Tensor]) -> Path:
    """A copy of ``base`` with params[name] += delta for each edit (saved as an HF directory)."""
    model = load_model(base)
    for name, delta in edits.items():
        model.params[name] += delta
    return save_pretrained(model, out)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("analysis")
    base = make_tiny_model(root / "base", seed=0)
    other = make_tiny_model(root / "other", seed=1)
    gen = torch.Generator().manual_seed(123)
    noise = {name: 0.05 * torch.randn(p.shape, generator=gen) for name, p in load_model(base).params.items()}
    return {"base": base, "other": other, "perturbed": _edited(base, root / "perturbed", noise), "root": root}


@pytest.fixture(scope="module")
def kl_results(models: dict[str, Path]) -> dict:
    return kl_drift_many(models["base"], {"self": models["base"], "perturbed": models["perturbed"]},
                         num_prompts=4, max_tokens=8, temperature=1.0, seed=3)


# ---------------------------------------------------------------------- KL


def test_kl_of_a_model_with_itself_is_zero(kl_results):
    r = kl_results["self"]
    assert r.num_tokens == sum(len(c) for _, c in r.sequences) > 0
    assert all(abs(v) <= 1e-6 for row in r.per_token for v in row)
    assert abs(r.mean_kl) <= 1e-6


def _hf_token_kl(base_dir: Path, tuned_dir: Path, pairs: list) -> list[list[float]]:
    """The oracle: transformers' own forward on the same token sequences, KL in fp64."""
    import transformers

    def load(path: Path):
        return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()

    base, tuned = load(base_dir), load(tuned_dir)
    out = []
    with torch.no_grad():
        for prompt, cont in pairs:
            ids = torch.tensor([prompt + cont[:-1]])
            lp = torch.log_softmax(base(ids).logits[0, len(prompt) - 1 :].double(), -1)
            lq = torch.log_softmax(tuned(ids).logits[0, len(prompt) - 1 :].double(), -1)
            out.append((lp.exp() * (lp - lq)).sum(-1).tolist())
    return out


def test_kl_of_a_perturbed_copy_matches_transformers(kl_results, models):
    r = kl_results["perturbed"]
    assert r.sequences == kl_results["self"].sequences  # one set of base continuations for every tuned model
    assert r.mean_kl > 1e-4
    want = _hf_token_kl(models["base"], models["perturbed"], r.sequences)
    for got_row, want_row in zip(r.per_token, want, strict=True):
        torch.testing.assert_close(torch.tensor(got_row), torch.tensor(want_row), rtol=1e-4, atol=1e-6)
    flat = [v for row in want for v in row]
    assert r.mean_kl == pytest.approx(sum(flat) / len(flat), rel=1e-4)
    assert r.per_prompt == pytest.approx([sum(row) / len(row) for row in want], rel=1e-4)


def test_kl_is_reproducible_and_independent_of_packing(kl_results, models):
    engine = Engine.from_pretrained(models["base"], kv_cache_tokens=512)
    small = kl_drift(engine, models["perturbed"], num_prompts=4, max_tokens=8, temperature=1.0, seed=3,
                     max_tokens_per_forward=5)  # one sequence per forward
    ref = kl_results["perturbed"]
    assert small.sequences == ref.sequences
    for got_row, want_row in zip(small.per_token, ref.per_token, strict=True):
        assert got_row == pytest.approx(want_row, rel=1e-5, abs=1e-7)


def test_prompt_sets(models, tmp_path):
    assert english_prompts(5, seed=1) == english_prompts(5, seed=1) != english_prompts(5, seed=2)
    assert len(english_prompts(100)) == 100
    engine = Engine.from_pretrained(models["base"], kv_cache_tokens=256)
    rand = random_vocab_prompts(engine.tokenizer, num=3, length=5, seed=0)
    assert len(rand) == 3 and all(len(p) == 5 for p in rand)
    assert all(engine.tokenizer.decode([t]).isalpha() for p in rand for t in p)
    (tmp_path / "p.txt").write_text("first line\n\nsecond line\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{"text": "b"}\n')
    assert read_prompts(tmp_path / "p.txt") == ["first line", "second line"]
    assert read_prompts(tmp_path / "p.jsonl", limit=1) == ["a"]
    with pytest.raises(ValueError, match="not found"):
        read_prompts(tmp_path / "missing.txt")


# ---------------------------------------------------------------------- geometry


@pytest.fixture(scope="module")
def geometry_case(models):
    """Run A: a rank-1 Δ on q_proj of layer 0, singular values (4, 3) on k_proj of layer 1, a norm shift.
    Run B: −Δ_A. Everything else untouched."""
    root, base = models["root"], models["base"]
    params = load_model(base).params
    gen = torch.Generator().manual_seed(7)
    q, k, n = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight", "model.norm.weight"
    u, v = torch.randn(params[q].shape[0], generator=gen), torch.randn(params[q].shape[1], generator=gen)
    left, _ = torch.linalg.qr(torch.randn(params[k].shape[0], 2, generator=gen))
    right, _ = torch.linalg.qr(torch.randn(params[k].shape[1], 2, generator=gen))
    delta = {q: torch.outer(u, v), k: left @ torch.diag(torch.tensor([4.0, 3.0])) @ right.T,
             n: torch.full(params[n].shape, 0.5)}
    run_a = _edited(base, root / "geo_a", delta)
    run_b = _edited(base, root / "geo_b", {name: -d for name, d in delta.items()})
    geo = update_geometry(base, {"a": run_a, "b": run_b}, top_k=(1, 2, 4))
    return geo, delta, load_file(str(base / "model.safetensors")), (u, v, q, k, n), (run_a, run_b)


def test_geometry_matches_hand_computed_values(geometry_case):
    geo, delta, weights, (u, v, q, k, n), _ = geometry_case
    q_norm = float(u.norm() * v.norm())
    n_norm = 0.5 * math.sqrt(weights[n].numel())
    row_q, row_k, row_n = geo.param(q), geo.param(k), geo.param(n)
    assert row_q["delta_norm"]["a"] == pytest.approx(q_norm, rel=1e-5)
    assert row_k["delta_norm"]["b"] == pytest.approx(5.0, rel=1e-5)
    assert row_n["delta_norm"]["a"] == pytest.approx(n_norm, rel=1e-5)
    assert row_q["relative"]["a"] == pytest.approx(q_norm / float(weights[q].double().norm()), rel=1e-5)
    assert row_q["energy"]["a"]["1"] == pytest.approx(1.0, abs=1e-6)
    assert row_k["energy"]["a"]["1"] == pytest.approx(16 / 25, abs=1e-5)
    assert row_k["energy"]["a"]["2"] == pytest.approx(1.0, abs=1e-6)
    assert row_q["stable_rank"]["a"] == pytest.approx(1.0, abs=1e-5)
    assert row_k["stable_rank"]["b"] == pytest.approx(25 / 16, rel=1e-4)
    for row in (row_q, row_k, row_n):
        assert row["cosine"]["a|b"] == pytest.approx(-1.0, abs=1e-6)
    untouched = geo.param("model.layers.0.mlp.up_proj.weight")
    assert untouched["delta_norm"]["a"] == 0.0 and math.isnan(untouched["cosine"]["a|b"])
    assert math.isnan(untouched["energy"]["a"]["1"])
    total = math.sqrt(q_norm**2 + 25.0 + n_norm**2)
    total_w = math.sqrt(sum(float(w.double().pow(2).sum()) for w in weights.values()))
    assert geo.total["delta_norm"]["a"] == pytest.approx(total, rel=1e-5)
    assert geo.total["relative"]["b"] == pytest.approx(total / total_w, rel=1e-5)
    assert geo.total["cosine"]["a|b"] == pytest.approx(-1.0, abs=1e-6)
    assert geo.layers["layers.0"]["delta_norm"]["a"] == pytest.approx(q_norm, rel=1e-5)
    assert geo.layers["layers.1"]["delta_norm"]["a"] == pytest.approx(5.0, rel=1e-5)
    assert geo.layers["final_norm"]["cosine"]["a|b"] == pytest.approx(-1.0, abs=1e-6)
    assert geo.kinds["self_attn.q_proj.weight"]["delta_norm"]["b"] == pytest.approx(q_norm, rel=1e-5)
    assert geo.total["mean_energy"]["a"]["1"] == pytest.approx((1.0 + 16 / 25) / 2, abs=1e-5)


def test_geometry_primitives():
    a = torch.randn(6, 5, dtype=torch.float64)
    s2 = torch.linalg.svdvals(a).pow(2)
    assert topk_energy(a, [1, 3, 10]) == pytest.approx({1: float(s2[0] / s2.sum()), 3: float(s2[:3].sum() / s2.sum()),
                                                        10: 1.0}, rel=1e-5)
    assert cosine(a, 2 * a) == pytest.approx(1.0) and cosine(a, -a) == pytest.approx(-1.0)
    assert math.isnan(cosine(a, torch.zeros_like(a)))
    assert stable_rank(torch.outer(torch.ones(4), torch.ones(3))) == pytest.approx(1.0)


# ---------------------------------------------------------------------- interpolation


class LetterTask:
    """Toy task: reward = fraction of completion characters in a–m; correct when the first one is."""

    name = "letters"
    use_chat_template = False
    system_prompt = None

    def eval_examples(self) -> list[Example]:
        return [Example(p, "", {}) for p in ["ab", "q=", "7*8=", "hello", "x y", "zz", "m", "12"]]

    def train_examples(self) -> list[Example]:
        return [Example(p, "", {}) for p in ["abc", "k"]]

    def reward(self, completions: list, prompts: list | None = None, **columns: object) -> list[float]:
        return [sum(ch in LETTERS for ch in c) / max(1, len(c)) for c in completions]

    def is_correct(self, completion: str, example: Example) -> bool:
        return completion[:1] in set(LETTERS)


@pytest.fixture(scope="module")
def interp_result(models):
    return interpolate(models["base"], models["other"], LetterTask(), alphas=[1.5, 0.0, -0.5, 1.0, 0.5],
                       size=None, train_size=2, max_tokens=4)


def test_interpolation_endpoints_equal_endpoint_models(interp_result, models):
    task = LetterTask()
    assert interp_result.alphas == [-0.5, 0.0, 0.5, 1.0, 1.5]
    for alpha, path in ((0.0, models["base"]), (1.0, models["other"])):
        engine = Engine.from_pretrained(path, kv_cache_tokens=1024)
        want = evaluate_point(engine, task, task.eval_examples(), 4, False)
        want.update(evaluate_point(engine, task, task.train_examples(), 4, False, prefix="train"))
        assert interp_result.at(alpha) == want
    assert set(interp_result.barriers) == {"eval/accuracy", "eval/reward", "train/accuracy", "train/reward"}


def test_interpolation_helpers(models):
    a, b = load_model(models["base"]).params, load_model(models["other"]).params
    assert all(torch.equal(interpolate_params(a, b, 0.0)[n], a[n]) for n in a)
    assert all(torch.equal(interpolate_params(a, b, 1.0)[n], b[n]) for n in a)
    mid = interpolate_params(a, b, 0.25)
    name = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(mid[name], 0.75 * a[name] + 0.25 * b[name])
    assert alpha_grid(5, -0.5, 1.5) == [-0.5, 0.0, 0.5, 1.0, 1.5]
    assert alpha_grid(3, 0.2, 0.8) == [0.0, 0.2, 0.5, 0.8, 1.0]
    assert barrier([0.0, 0.5, 1.0], [1.0, 0.25, 0.5]) == pytest.approx(0.5)
    assert barrier([0.0, 0.5, 1.0, 2.0], [0.0, 1.0, 0.0, -5.0]) == pytest.approx(0.0)
    assert math.isnan(barrier([0.5, 1.0], [0.1, 0.2]))
    engine = Engine.from_pretrained(models["base"], kv_cache_tokens=512)
    before = {n: t.clone() for n, t in engine.model.params.items()}
    interpolate(engine, models["other"], LetterTask(), alphas=[0.5], size=2, max_tokens=2)
    assert all(torch.equal(engine.model.params[n], before[n]) for n in before)  # θ_A restored


# ---------------------------------------------------------------------- report and CLI


def test_report_writes_plots_and_strict_json(kl_results, geometry_case, interp_result, tmp_path):
    written = write_report(tmp_path, kl=kl_results, geometry=geometry_case[0], interpolation=interp_result)
    for kind in ("kl", "geometry", "interpolation"):
        assert written[kind].suffix == ".png" and written[kind].stat().st_size > 5000
        assert written[kind].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = written["json"].read_text()
    assert "NaN" not in text and "Infinity" not in text
    data = json.loads(text)
    assert data["kl"]["perturbed"]["mean_kl"] == pytest.approx(kl_results["perturbed"].mean_kl)
    assert data["geometry"]["total"]["cosine"]["a|b"] == pytest.approx(-1.0, abs=1e-6)
    assert data["interpolation"]["alphas"] == interp_result.alphas
    write_report(tmp_path, interpolation=data["interpolation"])  # redraws from JSON alone and keeps the rest
    assert set(json.loads(written["json"].read_text())) == {"kl", "geometry", "interpolation"}


def test_cli(models, geometry_case, tmp_path, capsys):
    run_a, run_b = geometry_case[4]
    out = tmp_path / "report"
    assert cli.main(["geometry", "--base", str(models["base"]), "--run", f"a={run_a}", "--run", f"b={run_b}",
                     "--out", str(out), "--device", "cpu", "--top-k", "1,2"]) == 0
    assert "cos(a, b) = -1.0000" in capsys.readouterr().out
    assert cli.main(["kl", "--base", str(models["base"]), "--tuned", str(models["perturbed"]), "--out", str(out),
                     "--num-prompts", "2", "--max-tokens", "3", "--device", "cpu", "--prompt-set", "random"]) == 0
    task = f"{Path(__file__).parent / 'tiny_model.py'}:DigitTask"
    assert cli.main(["interpolate", "--a", str(models["base"]), "--b", str(models["other"]), "--task", task,
                     "--alphas", "0,1", "--max-tokens", "3", "--size", "2", "--out", str(out),
                     "--device", "cpu"]) == 0
    data = json.loads((out / "analysis.json").read_text())
    assert set(data) == {"geometry", "kl", "interpolation"} and "perturbed" in data["kl"]
    assert all((out / f"{k}.png").is_file() for k in ("geometry", "kl", "interpolation"))
    capsys.readouterr()
    assert cli.main(["kl", "--base", str(tmp_path / "missing"), "--tuned", str(models["base"]),
                     "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastes analyze: error:") and err.count("\n") == 1
    assert cli.main(["geometry", "--base", str(models["base"]), "--run", str(run_a), "--run", str(run_a),
                     "--out", str(out)]) == 2
    assert cli.main(["bogus"]) == 2


def test_geometry_plot_of_an_unchanged_model(models, tmp_path):
    """A run identical to its base (every Δ zero) still gets its plot and JSON."""
    base = models["base"]
    geo = update_geometry(base, {"same": base}, top_k=(1, 2))
    written = write_report(tmp_path, geometry=geo)
    assert (tmp_path / "geometry.png").is_file() and written
