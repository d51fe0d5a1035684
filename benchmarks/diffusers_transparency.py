"""Is the guard invisible when it does not act? diffusers' own fast pipeline tests, run twice.

    python benchmarks/diffusers_transparency.py --diffusers-src DIR [--work DIR] [--threads 2]

``DIR`` is a diffusers source checkout (its ``tests/`` are not in the wheel; tag v0.40.0's run
unchanged against diffusers 0.42). The tests of every pipeline the SD and SDXL adapters support run once
plain and once with every instance of those pipeline classes wrapped, as soon as it is built, in a
never-firing guard (``transparency_plugin.py``: a real guard, policy, engine and audit trail,
``fail_mode: closed``, with a random redirector whose classifier bias is -100), at the same torch
thread count. Printed per suite: tests and outcomes, pipeline calls, calls whose output digest
differs, guarded calls and generation records. Written: ``WORK/transparency.json``.

Offline set-up the script does itself: ``hf-internal-testing/tiny-random-clip`` (the tokenizer the
tests download) is replaced by a stand-in in a local ``HF_HOME`` (the first 998 entries of CLIP's
BPE vocabulary, from ``bpe_simple_vocab_16e6.txt.gz``, which the PyPI package ``open-clip-torch``
ships: ``pip install --no-deps --target DEPS open-clip-torch parameterized requests-mock`` and
pass ``--deps DEPS``; those two are the tests' own extra dependencies).
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from saferedir_adapters.tiny import bytes_to_unicode

HERE = Path(__file__).resolve().parent
SUITES = [  # diffusers' fast tests of the pipelines the first-party adapters claim
    "tests/pipelines/stable_diffusion/test_stable_diffusion.py",
    "tests/pipelines/stable_diffusion/test_stable_diffusion_img2img.py",
    "tests/pipelines/stable_diffusion/test_stable_diffusion_inpaint.py",
    "tests/pipelines/stable_diffusion_2/test_stable_diffusion.py",
    "tests/pipelines/stable_diffusion_2/test_stable_diffusion_v_pred.py",
    "tests/pipelines/controlnet/test_controlnet.py",
    "tests/pipelines/stable_diffusion_xl/test_stable_diffusion_xl.py",
    "tests/pipelines/stable_diffusion_xl/test_stable_diffusion_xl_img2img.py",
    "tests/pipelines/stable_diffusion_xl/test_stable_diffusion_xl_inpaint.py",
    "tests/pipelines/controlnet/test_controlnet_img2img.py",
    "tests/pipelines/controlnet/test_controlnet_inpaint.py",
    "tests/pipelines/controlnet/test_controlnet_sdxl.py",
    "tests/pipelines/controlnet/test_controlnet_sdxl_img2img.py",
    "tests/pipelines/controlnet/test_controlnet_inpaint_sdxl.py",
    "tests/pipelines/pag/test_pag_sd.py",
    "tests/pipelines/pag/test_pag_sdxl.py",
    "tests/pipelines/pag/test_pag_sd_img2img.py",
    "tests/pipelines/pag/test_pag_controlnet_sd.py",
]
#: instrumented in every suite: a test that builds one from another's components (SDXL base +
#: refiner, img2img from a txt2img pipeline) gets both wrapped, as a user guarding both would
CLASSES = [
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "StableDiffusionControlNetPipeline",
    "StableDiffusionControlNetImg2ImgPipeline",
    "StableDiffusionControlNetInpaintPipeline",
    "StableDiffusionXLControlNetPipeline",
    "StableDiffusionXLControlNetImg2ImgPipeline",
    "StableDiffusionXLControlNetInpaintPipeline",
    "StableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline",
    "StableDiffusionPAGPipeline",
    "StableDiffusionXLPAGPipeline",
    "StableDiffusionPAGImg2ImgPipeline",
    "StableDiffusionControlNetPAGPipeline",
]
TINY_CLIP = "hf-internal-testing/tiny-random-clip"


def write_tiny_clip(hf_home: Path, bpe_file: Path, size: int = 1000) -> None:
    """A CLIP tokenizer of ``size`` ids (bytes, bytes + ``</w>``, the first merges, start, end) in
    the hub cache's layout under ``hf_home``, so ``from_pretrained(TINY_CLIP)`` finds it offline."""
    merges = gzip.open(bpe_file, "rt", encoding="utf-8").read().split("\n")[1:]
    chars = list(bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars]
    n_merges = size - 2 - len(vocab_list)
    merge_lines = merges[:n_merges]
    vocab_list += ["".join(m.split()) for m in merge_lines]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    repo = hf_home / "hub" / f"models--{TINY_CLIP.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (snapshot / "vocab.json").write_text(json.dumps(vocab))
    (snapshot / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merge_lines) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    (snapshot / "special_tokens_map.json").write_text(json.dumps({**special, "pad_token": "<|endoftext|>"}))
    (snapshot / "tokenizer_config.json").write_text(
        json.dumps(
            {
                **special,
                "pad_token": "<|endoftext|>",
                "model_max_length": 77,
                "tokenizer_class": "CLIPTokenizer",
            }
        )
    )


def _bpe_file(deps: Path | None) -> Path:
    for root in [deps] if deps else []:
        found = list(root.glob("open_clip/bpe_simple_vocab_16e6.txt.gz"))
        if found:
            return found[0]
    spec = importlib.util.find_spec("open_clip")  # locate without importing (it imports torchvision)
    if spec and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
        if path.exists():
            return path
    raise SystemExit(
        "bpe_simple_vocab_16e6.txt.gz not found: pip install --no-deps --target DEPS open-clip-torch "
        "parameterized requests-mock, then pass --deps DEPS"
    )


def run_suite(src: Path, test_file: str, mode: str, work: Path, env: dict) -> list[dict]:
    out = work / f"{Path(test_file).stem}-{Path(test_file).parent.name}-{mode}.jsonl"
    out.unlink(missing_ok=True)
    run_env = {
        **env,
        "SAFEREDIR_TRANSPARENCY": mode,
        "SAFEREDIR_TRANSPARENCY_OUT": str(out),
        "SAFEREDIR_TRANSPARENCY_WORK": str(work / f"guard-{mode}"),
        "SAFEREDIR_TRANSPARENCY_CLASSES": ",".join(CLASSES),
    }
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        test_file,
        "-p",
        "transparency_plugin",
        "-q",
        "-p",
        "no:cacheprovider",
    ]
    cmd += ["--basetemp", str(work / f"pytest-{mode}")]
    subprocess.run(cmd, cwd=src, env=run_env, capture_output=True, text=True, timeout=3600)
    return [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []


def compare(plain: list[dict], wrapped: list[dict]) -> dict:
    def by(kind: str, rows: list[dict]) -> dict:
        return {(r["test"], r.get("index")): r for r in rows if r["kind"] == kind}

    outcomes_p, outcomes_w = by("outcome", plain), by("outcome", wrapped)
    calls_p, calls_w = by("call", plain), by("call", wrapped)
    audit_w = [r for r in wrapped if r["kind"] == "audit"]
    differing_outcomes = sorted(
        f"{k[0]}: {outcomes_p.get(k, {}).get('outcome')} -> {outcomes_w.get(k, {}).get('outcome')}"
        for k in set(outcomes_p) | set(outcomes_w)
        if outcomes_p.get(k, {}).get("outcome") != outcomes_w.get(k, {}).get("outcome")
    )
    differing_calls = sorted(
        f"{k[0]} call {k[1]}: {calls_p.get(k, {}).get('digest')} -> {calls_w.get(k, {}).get('digest')}"
        for k in set(calls_p) | set(calls_w)
        if calls_p.get(k, {}).get("digest") != calls_w.get(k, {}).get("digest")
    )
    unwrappable = [r for r in wrapped if r["kind"] == "unwrappable"]
    return {
        "tests": len(outcomes_p),
        "unwrappable_instances": len(unwrappable),
        "unwrappable_reasons": sorted({r["reason"].split(";")[0] for r in unwrappable}),
        "outcomes_plain": dict(Counter(r["outcome"] for r in outcomes_p.values())),
        "outcomes_wrapped": dict(Counter(r["outcome"] for r in outcomes_w.values())),
        "differing_outcomes": differing_outcomes,
        "calls": len(calls_p),
        "calls_wrapped_run": len(calls_w),
        "guarded_calls": sum(r["wrapped"] for r in calls_w.values()),
        "differing_digests": differing_calls,
        "records": sum(r["records"] for r in audit_w),
        "tests_where_records_differ_from_guarded_calls": [
            f"{r['test']}: {r['guarded_calls']} calls, {r['records']} records"
            for r in audit_w
            if r["records"] != r["guarded_calls"]
        ],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--diffusers-src", type=Path, required=True, help="a diffusers source checkout (with tests/)"
    )
    parser.add_argument("--work", type=Path, default=Path("bench-out/transparency"))
    parser.add_argument(
        "--deps",
        type=Path,
        default=None,
        help="--target folder of open-clip-torch, parameterized, requests-mock",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--suite", action="append", help="only these test files (repeatable)")
    args = parser.parse_args(argv)
    src, work = args.diffusers_src.resolve(), args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    hf_home = work / "hf-home"
    write_tiny_clip(hf_home, _bpe_file(args.deps))
    path = (
        [str(HERE)] + ([str(args.deps.resolve())] if args.deps else []) + [os.environ.get("PYTHONPATH", "")]
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in path if p),
        "HF_HOME": str(hf_home),
        "HF_HUB_OFFLINE": "1",
        "TMPDIR": str(work),
        "OMP_NUM_THREADS": str(args.threads),
        "SAFEREDIR_TRANSPARENCY_THREADS": str(args.threads),
    }
    results = {}
    for test_file in SUITES:
        if args.suite and test_file not in args.suite:
            continue
        if not (src / test_file).exists():
            print(f"{test_file}: not in {src}, skipped")
            continue
        t0 = time.perf_counter()
        plain = run_suite(src, test_file, "plain", work, env)
        wrapped = run_suite(src, test_file, "wrapped", work, env)
        results[test_file] = {**compare(plain, wrapped), "seconds": round(time.perf_counter() - t0, 1)}
        r = results[test_file]
        print(
            f"{test_file}: {r['tests']} tests plain {r['outcomes_plain']} wrapped {r['outcomes_wrapped']}; "
            f"outcomes differing {len(r['differing_outcomes'])}; calls {r['calls']} / {r['calls_wrapped_run']}, "
            f"guarded {r['guarded_calls']}, digests differing {len(r['differing_digests'])}; "
            f"instances no adapter claims (wrap refuses them) {r['unwrappable_instances']}; "
            f"records {r['records']} (tests where records != guarded calls: "
            f"{len(r['tests_where_records_differ_from_guarded_calls'])}); {r['seconds']} s",
            flush=True,
        )
        for line in (
            r["differing_outcomes"]
            + r["differing_digests"]
            + r["tests_where_records_differ_from_guarded_calls"]
        ):
            print("   ", line)
    (work / "transparency.json").write_text(json.dumps(results, indent=1))
    total = {
        k: sum(len(r[k]) if isinstance(r[k], list) else r[k] for r in results.values())
        for k in (
            "tests",
            "calls",
            "guarded_calls",
            "records",
            "unwrappable_instances",
            "differing_outcomes",
            "differing_digests",
        )
    }
    print("total:", json.dumps(total))
    clean = (
        not total["differing_outcomes"]
        and not total["differing_digests"]
        and total["records"] == total["guarded_calls"]
    )
    return 0 if clean and results else 1


if __name__ == "__main__":
    raise SystemExit(main())
