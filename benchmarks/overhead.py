"""What the guard costs where users run it: SD 1.5 scale, CFG, one run, interleaved (issue #15).

    python benchmarks/overhead.py --out bench-out/overhead            # CPU, fp32, 2 threads
    python benchmarks/overhead.py --device cuda --dtype fp16 ...      # on a GPU (gpu_check.sh)
    python benchmarks/overhead.py --scale tiny --rounds 1 ...         # the smoke test's size

The backbone is the real SD 1.5 UNet architecture (860 M parameters) and a CLIP-L-sized text
encoder (12 layers, 768 wide, 77 tokens), built from configs with random weights (nothing is
downloaded); 512x512 (64x64 latents), classifier-free guidance, batch 1. The redirectors are
random-weight bundles of the default capacity for that backbone whose classifier bias is set so they
always trigger (``triggered``: every check redirects) or never (``safe``): cost does not depend on
what they learnt.

It prints (and writes as JSON and Markdown under --out):

1. **End to end**, interleaved (A B C ... then ... C B A, ``--rounds`` times): s per pipeline call
   (``--steps`` denoising steps, ``output_type="latent"``), median and spread, ratio to unguarded:
   unguarded, a negative prompt, Safe Latent Diffusion (``saferedir_bench``'s hook: a third
   UNet pass per step), and the guard with 1/3/10/30 concepts, triggered and safe, checked every
   step (``replace_steps: 0``) and on the default schedule.
2. **The guard's own time per denoiser call**, by part (median of ``--reps`` calls of the hook's
   work on the real inputs, no UNet): the adapter's split and merge, the latent encoder, prompt
   and classifier, token heads (the stacked redirector's profiler scopes), and the engine's
   bookkeeping (decisions, deltas, combining); and per call, outside the loop: reading the
   decisions, building the report, writing the audit record.
3. **Kernels per checked step** (aten ops that run work, by the profiler): the engine's batched
   step vs a loop of the K redirectors' own forwards (the per-concept engine's floor).
4. **Memory**: bytes per concept of the weights the engine runs (and of the bundle file), and the
   added peak of one checked step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

CONCEPT_COUNTS = (1, 3, 10, 30)


def build_pipeline(scale: str, device: str, dtype: torch.dtype) -> Any:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from saferedir_adapters.tiny import char_clip_tokenizer, tiny_sd_pipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    if scale == "tiny":
        pipe = tiny_sd_pipeline(0)
    else:
        torch.manual_seed(0)
        unet = UNet2DConditionModel(  # SD 1.5's UNet config
            sample_size=64,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            cross_attention_dim=768,
            attention_head_dim=8,
        )
        encoder = CLIPTextModel(  # CLIP ViT-L/14's text tower
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                max_position_embeddings=77,
                hidden_act="quick_gelu",
                bos_token_id=49406,
                eos_token_id=49407,
            )
        )
        vae = AutoencoderKL(  # only its scale factor (8) matters: the calls return latents
            block_out_channels=(32, 32, 32, 32),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
        )
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=encoder,
            tokenizer=char_clip_tokenizer(),
            unet=unet,
            scheduler=DDIMScheduler(
                beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
            ),
            safety_checker=None,
            feature_extractor=None,
            image_encoder=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
    return pipe if (device, dtype) == ("cpu", torch.float32) else pipe.to(device=device, dtype=dtype)


def write_policies(pipe: Any, folder: Path) -> dict[str, Path]:
    """Bundles (random weights, default capacity, classifier bias +/-30) and one policy per guarded
    configuration; returns {label: policy path}."""
    from saferedir_adapters.sd import StableDiffusionAdapter

    from saferedir_sdk import Redirector, RedirectorConfig
    from saferedir_sdk.bundle import ConceptInfo, save_bundle

    fp = StableDiffusionAdapter(pipe).fingerprint()
    config = RedirectorConfig.for_backbone(fp)
    bundles: dict[str, list[Path]] = {"triggered": [], "safe": []}
    for kind, bias in (("triggered", 30.0), ("safe", -30.0)):
        for i in range(max(CONCEPT_COUNTS)):
            torch.manual_seed(100 + i)
            redirector = Redirector(config)
            with torch.no_grad():
                redirector.classifier[-1].bias.fill_(bias)
            path = folder / f"{kind}-{i}.safetensors"
            save_bundle(path, redirector, ConceptInfo(f"{kind}-{i}", "custom"), fp, {"benchmark": "overhead"})
            bundles[kind].append(path)
    policies = {}
    for kind in ("triggered", "safe"):
        for n in CONCEPT_COUNTS:
            for schedule, replace in (("every step", 0), ("default", None)):
                if schedule == "default" and n not in (3, 10):
                    continue
                label = f"guard {n} {kind}, {schedule}"
                defaults: dict[str, Any] = {} if replace is None else {"replace_steps": replace}
                doc = {
                    "version": 1,
                    "name": "overhead",
                    "audit": {
                        "sinks": ["file"],
                        "file": str(folder / "audit.jsonl"),
                        "prompt_logging": "sha256",
                    },
                    "defaults": defaults,
                    "concepts": [
                        {"concept": f"{kind}-{i}", "category": "custom", "redirector": {"path": str(p)}}
                        for i, p in enumerate(bundles[kind][:n])
                    ],
                }
                path = folder / f"policy-{kind}-{n}-{replace}.yaml"
                path.write_text(yaml.safe_dump(doc))
                policies[label] = path
    return policies


def spread(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def end_to_end(pipe: Any, policies: dict[str, Path], args: argparse.Namespace) -> dict[str, Any]:
    from saferedir_adapters.sd import StableDiffusionAdapter
    from saferedir_bench.baselines import SafeLatentGuidance, SLDConfig

    from saferedir_sdk import SafeRedirGuard

    prompt = "a photograph of an astronaut riding a horse"
    adapter = StableDiffusionAdapter(pipe)
    sld_concept = adapter.encode_prompts(["nudity, violence, hate"])[0]
    sld = SafeLatentGuidance(sld_concept, SLDConfig.preset("medium", args.steps))
    guards = {
        label: SafeRedirGuard.from_policy(path) for label, path in policies.items() if label in args.configs
    }

    def call(**extra: Any) -> None:
        pipe(
            prompt,
            num_inference_steps=args.steps,
            height=args.size,
            width=args.size,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
            **extra,
        )

    def run(label: str) -> float:
        if label in guards:
            guard = guards[label]
            guard.wrap(pipe)
            try:
                sync(args.device)
                start = time.perf_counter()
                call()
                sync(args.device)
                elapsed = time.perf_counter() - start
            finally:
                guard.unwrap(pipe)
            report = guard.last_report
            assert report is not None and report.error is None and not report.fail_open, label
            expected = "redirected" if "triggered" in label else "none"
            assert report.samples[0].action == expected, (label, report.samples[0].action)
            return elapsed
        sync(args.device)
        start = time.perf_counter()
        if label == "negative prompt":
            call(negative_prompt="blurry, low quality, watermark")
        elif label == "safe latent diffusion":
            with sld.active(adapter, batch_size=1):
                call()
        else:
            call()
        sync(args.device)
        return time.perf_counter() - start

    labels = [
        "unguarded",
        "negative prompt",
        "safe latent diffusion",
        *[lb for lb in policies if lb in guards],
    ]
    for label in labels:  # warm-up: one call each (allocator, kernels, first-call caches)
        run(label)
    times: dict[str, list[float]] = {label: [] for label in labels}
    for r in range(args.rounds):  # A B C ... then ... C B A: a drift over the run cancels out
        for label in labels if r % 2 == 0 else labels[::-1]:
            times[label].append(run(label))
    base = statistics.median(times["unguarded"])
    return {
        label: {**spread(v), "ratio": statistics.median(v) / base, "ratio_min": min(v) / base}
        for label, v in times.items()
    }


def hook_parts(pipe: Any, policies: dict[str, Path], args: argparse.Namespace) -> dict[str, Any]:
    """The guard's own work per denoiser call (no UNet), by part, on the inputs the UNet gets."""
    from saferedir_adapters.sd import StableDiffusionAdapter

    from saferedir_sdk import SafeRedirGuard
    from saferedir_sdk.fingerprint import WeightsProbe
    from saferedir_sdk.guard.report import build_report

    adapter = StableDiffusionAdapter(pipe)
    device, dtype = torch.device(args.device), pipe.unet.dtype
    latent = args.size // pipe.vae_scale_factor
    embeds = (
        adapter.encode_prompts(["a photograph of an astronaut riding a horse"])[0].tokens[0].to(device, dtype)
    )
    negative = torch.zeros_like(embeds)
    sample = torch.randn(2, pipe.unet.config.in_channels, latent, latent, device=device, dtype=dtype)
    timestep = torch.tensor(500, device=device)
    args_in = (sample, timestep)
    kwargs_in = {"encoder_hidden_states": torch.cat([negative, embeds]), "return_dict": False}
    results: dict[str, Any] = {}

    def timed(fn: Any) -> float:
        values = []
        for _ in range(args.reps):
            sync(args.device)
            start = time.perf_counter()
            fn()
            sync(args.device)
            values.append(time.perf_counter() - start)
        return statistics.median(values) * 1000.0

    def split_merge() -> None:
        inputs = adapter.split(args_in, kwargs_in, 1)
        adapter.merge(args_in, kwargs_in, inputs)

    timed(split_merge)
    split_ms = timed(split_merge)

    def unet_step() -> None:
        with torch.no_grad():
            pipe.unet(*args_in, **kwargs_in)

    unet_ms = statistics.median([timed_once(unet_step, args.device) for _ in range(args.unet_reps)])
    results["unet_step_ms"] = unet_ms

    wrapped = {name: getattr(pipe, name) for name in ("unet", "text_encoder")}  # what the guard hooks
    seen = {name: WeightsProbe.read(m) for name, m in wrapped.items()}

    def weights_probe() -> None:  # per guarded call: have the hooked modules' weights changed?
        for name, module in wrapped.items():
            WeightsProbe.read(module).changed_since(seen[name])

    timed(weights_probe)
    results["weights_probe_ms"] = timed(weights_probe)
    for label, path in policies.items():
        if "every step" not in label:
            continue
        guard = SafeRedirGuard.from_policy(path)
        guard.wrap(pipe)
        engine = pipe.__dict__["_saferedir_wrapping"].engine
        guard.unwrap(pipe)
        inputs = adapter.split(args_in, kwargs_in, 1)
        state = engine.init_state(inputs.cond)

        def step(engine: Any = engine, inputs: Any = inputs, state: Any = state) -> None:
            engine.step(inputs.latents, inputs.timestep, inputs.cond, state, inputs.uncond)

        timed(step)
        step_ms = timed(step)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(args.reps):
                step()
        scopes = {
            e.key.removeprefix("saferedir."): e.cpu_time_total / 1000.0 / args.reps
            for e in prof.key_averages()
            if e.key.startswith("saferedir.")
        }
        profiled_ms = sum(scopes.values())

        def forwards(engine: Any = engine, inputs: Any = inputs) -> None:
            for group in engine.groups:
                group.stack(inputs.latents, inputs.timestep, inputs.cond)

        timed(forwards)
        forward_ms = timed(forwards)  # the stacked forwards without the profiler; its parts below

        def per_call(engine: Any = engine, state: Any = state, guard: Any = guard) -> None:
            decisions = engine.decisions(state)
            report = build_report(
                request_id="x",
                decisions=decisions,
                rules=[c.rule for c in engine.concepts],
                prompts=["p"],
                num_images_per_prompt=1,
                batch_size=1,
                steps=args.steps,
                cfg=True,
                fail_open=[],
                error=None,
                latency_ms=0.0,
                render_prompt=guard.audit.prompt,
                redact=lambda m: m,
            )
            guard.audit.emit_event("saferedir.generation", "x", report.to_dict())

        timed(per_call)
        results[label] = {
            "hook_ms": split_ms + step_ms,
            "step_ratio": (unet_ms + split_ms + step_ms) / unet_ms,  # a denoising step with / without
            "split_merge_ms": split_ms,
            "engine_step_ms": step_ms,
            # the forwards' time split as the profiler scopes split it (the profiler itself slows them)
            **{f"{name}_ms": forward_ms * ms / profiled_ms for name, ms in scopes.items()},
            "bookkeeping_ms": step_ms - forward_ms,
            "per_call_outside_loop_ms": timed(per_call),
        }
    return results


def timed_once(fn: Any, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - start) * 1000.0


def kernels_and_memory(pipe: Any, policies: dict[str, Path], args: argparse.Namespace) -> dict[str, Any]:
    from saferedir_adapters.sd import StableDiffusionAdapter

    from saferedir_sdk import SafeRedirGuard
    from saferedir_sdk.stacked import kernel_ops

    adapter = StableDiffusionAdapter(pipe)
    cpu_pipe_dtype = torch.float32
    latent = args.size // pipe.vae_scale_factor
    embeds = adapter.encode_prompts(["a photograph"])[0].tokens[0].to("cpu", cpu_pipe_dtype)
    from saferedir_sdk import Conditioning

    cond = Conditioning((embeds,))
    latents = torch.randn(1, 4, latent, latent)
    t = torch.tensor(0.5)
    out: dict[str, Any] = {}
    for n in CONCEPT_COUNTS:
        guard = SafeRedirGuard.from_policy(policies[f"guard {n} triggered, every step"])
        guard.wrap(pipe)
        engine = pipe.__dict__["_saferedir_wrapping"].engine
        guard.unwrap(pipe)
        for group in engine.groups:  # the kernel count is the same on any device: count on the CPU
            group.stack.weights = {k: v.cpu() for k, v in group.stack.weights.items()}
            group.stack._copies.clear()
        state = engine.init_state(cond)
        engine.step(latents, t, cond, state)
        state = engine.init_state(cond)
        batched = sum(kernel_ops(lambda e=engine, s=state: e.step(latents, t, cond, s)).values())
        redirectors = [c.redirector.cpu() for c in engine.concepts]
        loop = sum(kernel_ops(lambda r=redirectors: [x(latents, t, cond) for x in r]).values())
        stack = engine.groups[0].stack
        module_bytes = sum(p.numel() * p.element_size() for r in redirectors for p in r.parameters())
        peak = _peak_cpu_bytes(lambda e=engine, s=state: e.step(latents, t, cond, s))
        out[str(n)] = {
            "kernels_batched_step": batched,
            "kernels_loop_of_forwards": loop,
            "stacked_weight_bytes_per_concept": stack.nbytes() // n,
            "module_weight_bytes_per_concept": module_bytes // n,  # the loaded bundle's module, kept too
            "step_peak_bytes_per_concept": peak // n,
            "step_peak_bytes": peak,
        }
    bundle = next(Path(policies["guard 1 triggered, every step"]).parent.glob("triggered-0.safetensors"))
    out["bundle_file_bytes"] = bundle.stat().st_size
    return out


def _peak_cpu_bytes(fn: Any) -> int:
    """Peak of the CPU memory ``fn`` allocates and holds at once: each op's own allocations minus
    frees (the profiler's self memory, children excluded) and the frees outside ops, in time order."""
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        fn()
    held = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        held += e.self_cpu_memory_usage
        peak = max(peak, held)
    return peak


def cuda_memory(pipe: Any, policies: dict[str, Path], args: argparse.Namespace) -> dict[str, Any]:
    """Added peak GPU memory of a guarded call per concept count (torch.cuda.max_memory_allocated)."""
    from saferedir_sdk import SafeRedirGuard

    def peak(guard: Any | None) -> int:
        if guard is not None:
            guard.wrap(pipe)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        pipe("a photograph", num_inference_steps=2, output_type="latent", height=args.size, width=args.size)
        torch.cuda.synchronize()
        value = torch.cuda.max_memory_allocated()
        if guard is not None:
            guard.unwrap(pipe)
        return value

    base = peak(None)
    result = {}
    for n in CONCEPT_COUNTS:
        guard = SafeRedirGuard.from_policy(policies[f"guard {n} triggered, every step"])
        result[str(n)] = {"added_peak_bytes": peak(guard) - base, "per_concept": (peak(guard) - base) // n}
    return result


def sync_check(pipe: Any, policies: dict[str, Path], args: argparse.Namespace) -> str:
    """A guarded generation under ``torch.cuda.set_sync_debug_mode("error")``: any host sync inside the
    denoising loop raises. The pipeline's own syncs (scheduler, output) run outside the check: it
    is switched on by the guard's hook at the first denoiser call and off at the call's end."""
    from saferedir_sdk import SafeRedirGuard

    guard = SafeRedirGuard.from_policy(policies["guard 3 triggered, every step"])
    guard.wrap(pipe)
    probe = {"calls": 0}

    def on(_m: Any, _a: Any, _k: Any) -> None:
        probe["calls"] += 1
        torch.cuda.set_sync_debug_mode("error")

    def off(_m: Any, _a: Any, _k: Any, _o: Any) -> None:
        torch.cuda.set_sync_debug_mode(0)

    # the mode is on exactly while the guard's hook runs: one pre-hook before it turns it on, one
    # after it turns it off (the UNet and the scheduler are not the guard's to check)
    h1 = pipe.unet.register_forward_pre_hook(on, with_kwargs=True, prepend=True)
    h2 = pipe.unet.register_forward_pre_hook(lambda m, a, k: off(m, a, k, None), with_kwargs=True)
    try:
        pipe("a photograph", num_inference_steps=4, output_type="latent", height=args.size, width=args.size)
    finally:
        torch.cuda.set_sync_debug_mode(0)
        h1.remove()
        h2.remove()
        guard.unwrap(pipe)
    return f"ok: {probe['calls']} guarded denoiser calls with no host synchronisation"


def markdown(result: dict[str, Any]) -> str:
    def table(header: list[str], rows: list[list[str]]) -> list[str]:
        return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)] + [
            "| " + " | ".join(r) + " |" for r in rows
        ]

    lines = [f"# Overhead ({result['setup']})", ""]
    lines += table(
        ["configuration", "s/call median", "min", "max", "ratio"],
        [
            [label, f"{r['median']:.3f}", f"{r['min']:.3f}", f"{r['max']:.3f}", f"{r['ratio']:.4f}"]
            for label, r in result["end_to_end"].items()
        ],
    )
    parts = dict(result["hook_parts"])
    unet_ms = parts.pop("unet_step_ms")
    probe_ms = parts.pop("weights_probe_ms")
    lines += ["", f"UNet step (one denoiser call, the CFG batch): {unet_ms:.1f} ms", ""]
    lines += [f"per call: the weights probe of the UNet and text encoder: {probe_ms:.2f} ms", ""]
    names = ["split_merge", "latent_encoder", "prompt_and_classifier", "token_heads", "bookkeeping"]
    lines += table(
        ["guard (checked every step)", "hook ms/step", "step ratio", *names, "per call, outside loop"],
        [
            [label, f"{r['hook_ms']:.2f}", f"{r['step_ratio']:.5f}"]
            + [f"{r.get(n + '_ms', 0.0):.2f}" for n in names]
            + [f"{r['per_call_outside_loop_ms']:.2f}"]
            for label, r in parts.items()
        ],
    )
    km = result["kernels_memory"]
    lines.append("")
    lines += table(
        [
            "concepts",
            "kernels/checked step (batched)",
            "loop of K forwards",
            "MB/concept: stacked weights",
            "module weights",
            "step peak",
            "step peak MB",
        ],
        [
            [
                str(n),
                str(r["kernels_batched_step"]),
                str(r["kernels_loop_of_forwards"]),
                f"{r['stacked_weight_bytes_per_concept'] / 1e6:.2f}",
                f"{r['module_weight_bytes_per_concept'] / 1e6:.2f}",
                f"{r['step_peak_bytes_per_concept'] / 1e6:.2f}",
                f"{r['step_peak_bytes'] / 1e6:.1f}",
            ]
            for n, r in ((n, km[str(n)]) for n in CONCEPT_COUNTS)
        ],
    )
    lines.append(f"\nbundle file per concept: {km['bundle_file_bytes'] / 1e6:.2f} MB")
    if "cuda_memory" in result:
        lines.append("\nadded peak GPU memory: " + json.dumps(result["cuda_memory"]))
    if "sync_check" in result:
        lines.append("\nsync check: " + result["sync_check"])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=["sd15", "tiny"], default="sd15")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="denoising steps per end-to-end call")
    parser.add_argument("--rounds", type=int, default=4, help="even: as many reversed rounds as forward")
    parser.add_argument("--reps", type=int, default=20, help="repetitions of the hook-part timings")
    parser.add_argument("--unet-reps", type=int, default=3, help="bare UNet calls timed for the step ratio")
    parser.add_argument("--size", type=int, default=None, help="image size (default 512; tiny: 64)")
    parser.add_argument(
        "--configs",
        default="all",
        help="semicolon-separated guarded configurations for the end-to-end table (labels as printed), or all",
    )
    parser.add_argument(
        "--sync-check", action="store_true", help="CUDA: a guarded call under sync debug mode"
    )
    parser.add_argument(
        "--hook-parts-only", action="store_true", help="only the per-step and per-call hook parts (minutes)"
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.size = args.size or (64 if args.scale == "tiny" else 512)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    pipe = build_pipeline(args.scale, args.device, dtype)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        policies = write_policies(pipe, Path(tmp))
        args.configs = set(policies) if args.configs == "all" else set(args.configs.split(";"))
        setup = f"{args.scale}, {args.device} {args.dtype}, {args.threads} threads, {args.size}x{args.size}, CFG, batch 1, {args.steps} steps/call"
        print(setup, flush=True)
        result: dict[str, Any] = {"setup": setup, "torch": torch.__version__}
        if args.hook_parts_only:
            result["hook_parts"] = hook_parts(pipe, policies, args)
            print(json.dumps(result["hook_parts"], indent=1), flush=True)
            (args.out / "hook_parts.json").write_text(json.dumps(result, indent=1))
            return result
        result["kernels_memory"] = kernels_and_memory(pipe, policies, args)
        print(json.dumps(result["kernels_memory"], indent=1), flush=True)
        result["hook_parts"] = hook_parts(pipe, policies, args)
        print(json.dumps(result["hook_parts"], indent=1), flush=True)
        if args.device == "cuda":
            result["cuda_memory"] = cuda_memory(pipe, policies, args)
            if args.sync_check:
                result["sync_check"] = sync_check(pipe, policies, args)
        result["end_to_end"] = end_to_end(pipe, policies, args)
    (args.out / "overhead.json").write_text(json.dumps(result, indent=1))
    table = markdown(result)
    (args.out / "overhead.md").write_text(table)
    print(table)
    return result


if __name__ == "__main__":
    main()
