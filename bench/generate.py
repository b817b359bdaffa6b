"""ES generation throughput: fastes population vs fastes unperturbed vs the member-by-member HF loop.

    python -m bench.generate [--quick] [--threads N] [--model NAME] [--members N] [--prompts P]
                             [--max-tokens T] [--loop-members K]

Side by side in one run, same model, population size N, prompts (P per member, equal lengths so that
HF needs no padding) and max_tokens (greedy, no EOS: every sequence generates exactly T tokens):

1. ``unperturbed``: fastes generating the N·P sequences of one model (the prompts repeated N times);
2. ``population/<mode>``: fastes generating P prompts for each of the N members in one continuous
   batch, for lowrank (rank 1, Gaussian), full Gaussian and full Rademacher noise;
3. ``hf_loop``: what users run today: for each member, set the HF transformers model's perturbed
   weights to W + ``engine.perturbation(...)`` (full Gaussian noise, as in Qiu et al.), ``generate``
   the P prompts as one batch, restore W from a saved copy.

Reported: generated tokens/s and the ratios (2)/(1) (DESIGN §7: lowrank ≥ 0.95, full ≥ 0.25 at
N = 32) and (2)/(3) (≥ 50× on GPU, ≥ 10× on CPU). CPU: a tiny random Llama (fp32); only the ratios
mean something, and only on an idle host. GPU: random-weight models with the shapes of
Qwen2.5-0.5B and 1.5B (bf16), N = 32, 16 prompts per member, 256 new tokens; there the HF loop is
timed on 4 members and scaled to N (each member costs the same; ``hf_loop_members_timed`` and the
raw ``hf_loop_measured_s`` are recorded), and the fastes cases are also run without CUDA graphs.
``--model demo-model`` times the bundled checkpoint at the demo's ES-step shape (N = 32, 64 problems,
6 new tokens). JSON with the device, versions, git commit, configuration and raw timings goes to
bench/results/generate-<device>-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from bench.common import current_device, device_name, git_commit, positive_int, timed, versions, write_result

QWEN_COMMON = dict(vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                   tie_word_embeddings=True, bos_token_id=None, eos_token_id=None)
MODELS = {
    "qwen2.5-0.5b-shape": ("Qwen2Config", dict(QWEN_COMMON, hidden_size=896, intermediate_size=4864,
                                               num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2)),
    "qwen2.5-1.5b-shape": ("Qwen2Config", dict(QWEN_COMMON, hidden_size=1536, intermediate_size=8960,
                                               num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2)),
    "tiny-llama": ("LlamaConfig", dict(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                       bos_token_id=None, eos_token_id=None)),
    "tinier-llama": ("LlamaConfig", dict(vocab_size=256, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                         bos_token_id=None, eos_token_id=None)),
}
MODES = {"lowrank": dict(mode="lowrank", rank=1, noise="gaussian"), "full-gaussian": dict(mode="full"),
         "full-rademacher": dict(mode="full", noise="rademacher")}
SIGMA, SEED, STEP = 1e-3, 0, 0


def build_model(name: str, path: Path, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """A random-weight HF model of the named shape, saved to ``path`` (safetensors) and kept for the HF loop."""
    import transformers

    cls_name, kwargs = MODELS[name]
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: a 1.5B init on the host takes minutes
        hf = transformers.AutoModelForCausalLM.from_config(config)
    hf = hf.to(dtype).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    hf.save_pretrained(str(path))
    return hf


def hf_loop(engine: object, hf: torch.nn.Module, pop: object, prompts: torch.Tensor, max_tokens: int,
            members: int | None = None) -> None:
    """The member-by-member loop: perturb the HF weights in place, generate, restore (from a saved copy).

    ``members``: run only the first that many members (each costs the same; the caller scales the time).
    """
    params = dict(hf.named_parameters())
    names = [n for n in engine.perturbed_names(pop) if n in params]  # type: ignore[attr-defined]
    saved = {n: params[n].detach().clone() for n in names}
    mask = torch.ones_like(prompts)
    with torch.no_grad():
        for member in range(members or pop.size):  # type: ignore[attr-defined]
            for n in names:
                delta = engine.perturbation(n, member, pop, STEP)  # type: ignore[attr-defined]
                params[n].copy_((saved[n].float() + delta).to(params[n].dtype))
            hf.generate(prompts, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                        do_sample=False, pad_token_id=0, eos_token_id=None)
            for n in names:
                params[n].copy_(saved[n])


def demo_prompts(engine: object, count: int) -> torch.Tensor:
    """``count`` 3-digit additions "a+b=" of the demo task, as token ids (all 8 tokens long)."""
    gen = torch.Generator().manual_seed(1)
    pairs = torch.randint(100, 1000, (count, 2), generator=gen).tolist()
    return torch.tensor([engine.tokenizer.encode(f"{a}+{b}=") for a, b in pairs])  # type: ignore[attr-defined]


def bench_model(name: str, device: str, dtype: torch.dtype, members: int, per_member: int, prompt_len: int,
                max_tokens: int, reps: int, loop_reps: int, loop_members: int | None = None) -> dict[str, object]:
    """Time every case on one model; ``loop_members`` times the HF loop on that many members and scales to N."""
    from fastes import Engine, Population, SamplingParams

    kv_tokens = int(1.25 * members * per_member * (prompt_len + max_tokens)) + 1024
    if name == "demo-model":  # the bundled trained checkpoint, with its own tokenizer and task prompts
        import transformers

        path = Path(__file__).resolve().parents[1] / "fastes" / "data" / "demo-model"
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
        engine = Engine.from_pretrained(path, dtype=dtype, device=device, kv_cache_tokens=kv_tokens)
        prompts = demo_prompts(engine, per_member)
        prompt_len = prompts.shape[1]
    else:
        with tempfile.TemporaryDirectory(prefix="fastes-bench-") as tmp:
            hf = build_model(name, Path(tmp), device, dtype)
            engine = Engine.from_pretrained(tmp, dtype=dtype, device=device, kv_cache_tokens=kv_tokens)
        gen = torch.Generator().manual_seed(1)
        prompts = torch.randint(0, engine.model.config.vocab_size, (per_member, prompt_len), generator=gen)
    prompt_lists = prompts.tolist()
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    warm = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    tokens = members * per_member * max_tokens
    pops = {mode: Population(size=members, sigma=SIGMA, seed=SEED, **kw) for mode, kw in MODES.items()}

    cases: dict[str, Callable[[], object]] = {
        "unperturbed": lambda: engine.generate(prompt_lists * members, params)}
    for mode, pop in pops.items():
        cases[f"population/{mode}"] = lambda pop=pop: engine.generate(prompt_lists, params, population=pop, step=STEP)
    engine.generate(prompt_lists * members, warm)
    for pop in pops.values():
        engine.generate(prompt_lists, warm, population=pop, step=STEP)
    times: dict[str, list[float]] = {}
    for case, fn in cases.items():
        times[case] = timed(fn, reps, device)
        print(f"  {case:28s} {tokens / statistics.median(times[case]):10.1f} tok/s", flush=True)
    graphs, engine.decode_graphs = engine.decode_graphs, None
    if graphs is not None:  # the same cases with every decode step launched eagerly: what the graphs save
        for case in ("unperturbed", "population/lowrank"):
            times[f"{case} (eager)"] = timed(cases[case], reps, device)
            print(f"  {case + ' (eager)':28s} {tokens / statistics.median(times[case + ' (eager)']):10.1f} tok/s",
                  flush=True)
    engine.decode_graphs = graphs
    out = engine.generate(prompt_lists, params, population=pops["lowrank"], step=STEP)
    assert all(len(c.token_ids) == max_tokens for per_prompt in out for s in per_prompt for c in s)

    loop_prompts = prompts.to(device)
    timed_members = min(loop_members or members, members)
    hf_loop(engine, hf, pops["full-gaussian"], loop_prompts, 2, 1)  # warm-up
    loop_times = timed(lambda: hf_loop(engine, hf, pops["full-gaussian"], loop_prompts, max_tokens, timed_members),
                       loop_reps, device)
    times["hf_loop"] = [t * members / timed_members for t in loop_times]
    print(f"  {'hf_loop (full-gaussian)':28s} {tokens / statistics.median(times['hf_loop']):10.1f} tok/s", flush=True)

    tps = {case: tokens / statistics.median(ts) for case, ts in times.items()}
    ratios = {}
    for mode in MODES:
        key = f"population/{mode}"
        ratios[f"{mode}/unperturbed"] = tps[key] / tps["unperturbed"]
        ratios[f"{mode}/hf_loop"] = tps[key] / tps["hf_loop"]
    config = MODELS[name][1] if name in MODELS else dataclasses.asdict(engine.model.config)
    return dict(model=name, config=config, dtype=str(dtype), members=members, prompts_per_member=per_member,
                prompt_len=prompt_len, max_tokens=max_tokens, generated_tokens=tokens, sigma=SIGMA,
                hf_loop_noise="full-gaussian", hf_loop_members_timed=timed_members, hf_loop_measured_s=loop_times,
                cuda_graphs=graphs is not None, times_s=times, tokens_per_s=tps, ratios=ratios)


def run(quick: bool, model: str | None = None, members: int | None = None, per_member: int | None = None,
        max_tokens: int | None = None, loop_members: int | None = None) -> dict[str, object]:
    device = current_device()
    if device == "cuda":  # the shapes: N = 32, 16-64 prompts per member, 256-1024 new tokens
        dtype, n, p, prompt_len, t = torch.bfloat16, 32, (8 if quick else 16), 32, (64 if quick else 256)
        names = ["qwen2.5-0.5b-shape"] if quick else ["qwen2.5-0.5b-shape", "qwen2.5-1.5b-shape"]
        reps, loop_reps, loop_n = (1, 1, 2) if quick else (3, 1, 4)
    else:
        dtype, n, p, prompt_len = torch.float32, 8, (2 if quick else 4), 16
        t = 16 if quick else 32
        names = ["tinier-llama"] if quick else ["tiny-llama"]
        reps, loop_reps, loop_n = (1, 1, None) if quick else (2, 1, None)
    if model == "demo-model":  # the demo's ES step: N = 32, 64 problems of 8 tokens, 6 new tokens
        n, p, t, prompt_len = 32, 64, 6, 8
    names = [model] if model else names
    members, per_member, max_tokens = members or n, per_member or p, max_tokens or t
    loop_members = loop_members or loop_n
    print(f"{device_name(device)} ({dtype}, {torch.get_num_threads()} threads): N = {members}, "
          f"{per_member} prompts/member of {prompt_len} tokens, {max_tokens} new tokens each")
    results = []
    for name in names:
        print(f"{name}:")
        res = bench_model(name, device, dtype, members, per_member, prompt_len, max_tokens, reps, loop_reps,
                          loop_members)
        gc.collect()  # the model, its HF twin and the KV pool go before the next model is built
        if device == "cuda":
            torch.cuda.empty_cache()
        for key, value in res["ratios"].items():  # type: ignore[union-attr]
            print(f"  ratio {key:30s} {value:8.3f}")
        results.append(res)
    return dict(bench="generate", device=device_name(device), device_type=device, **versions(),
                git_commit=git_commit(), quick=quick, threads=torch.get_num_threads(),
                targets={"lowrank/unperturbed": 0.95, "full/unperturbed (N=32)": 0.25,
                         "population/hf_loop": 50.0 if device == "cuda" else 10.0},
                results=results)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one smaller model, fewer tokens and repetitions")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default on CPU: 1; tiny ops on a shared host lose more to thread "
                             "wake-ups than they gain, ~40x here on a loaded 2-core box)")
    parser.add_argument("--model", choices=[*MODELS, "demo-model"], default=None,
                        help="one model instead of the device's default list (demo-model: the bundled checkpoint "
                             "at the demo's ES-step shape)")
    parser.add_argument("--members", type=positive_int, default=None, help="population size N")
    parser.add_argument("--prompts", type=positive_int, default=None, help="prompts per member")
    parser.add_argument("--max-tokens", type=positive_int, default=None, help="new tokens per sequence")
    parser.add_argument("--loop-members", type=positive_int, default=None,
                        help="time the HF loop on this many members and scale to N (default: all on CPU, 4 on GPU)")
    args = parser.parse_args(argv)
    if args.members is not None and args.members % 2:
        parser.error(f"--members must be even (the population is antithetic), got {args.members}")
    if args.threads or not torch.cuda.is_available():
        torch.set_num_threads(args.threads or 1)
    result = run(args.quick, args.model, args.members, args.prompts, args.max_tokens, args.loop_members)
    print(f"wrote {write_result('generate', result, str(result['device']))}")


if __name__ == "__main__":
    main()
