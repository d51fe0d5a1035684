"""What a bundle's classifier and token heads say at every check of unguarded generations.

For each prompt (one batch, one generator seed) it records the Shapes backbone's own trajectory and
prints, per check step, p(unsafe), the scale alpha and the mask on the concept's token (the first
token that is one of ``--words``), e.g. why a long prompt escapes::

    python benchmarks/probe_scores.py --bundle red --seed 3 --words red scarlet \\
        "vector art, high detail, red plain circle, clean edges, 4k" "digital art of a red plain circle"

``--bundle`` is a shipped Shapes bundle name (red, striped, star) or a path to a bundle file.
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompts", nargs="+")
    parser.add_argument("--bundle", default="red")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--every", type=int, default=2, help="print every n-th step (the demo policy checks every 2nd)"
    )
    parser.add_argument("--words", nargs="*", default=[], help="concept words whose token's mask to print")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from saferedir_shapes.pipeline import DEFAULT_GUIDANCE, load_shapes_pipeline
    from saferedir_shapes.plugin import bundle_path

    from saferedir_sdk.bundle import load_bundle
    from saferedir_sdk.plugins import default_plugin_manager, find_adapter
    from saferedir_sdk.training import record_trajectories

    path = args.bundle if args.bundle.endswith(".safetensors") else bundle_path(args.bundle)
    redirector = load_bundle(path).redirector.eval()
    pipe = load_shapes_pipeline()
    adapter = find_adapter(default_plugin_manager(), pipe)
    rows = record_trajectories(
        adapter,
        args.prompts,
        seeds=[args.seed],
        num_inference_steps=args.steps,
        guidance_scale=DEFAULT_GUIDANCE,
    )
    with torch.no_grad():
        out = redirector(*rows.inputs("cpu"))
    p = torch.sigmoid(out.logit)
    for i, prompt in enumerate(args.prompts):
        pieces = pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer(prompt, truncation=True).input_ids)
        slot = next((k for k, w in enumerate(pieces) if w in set(args.words)), None)
        print(prompt)
        for r in (rows.prompt_ids == i).nonzero().flatten().tolist():
            if int(rows.steps[r]) % args.every:
                continue
            mask = f" mask[{pieces[slot]}]={float(out.masks[0][r, slot]):.2f}" if slot is not None else ""
            print(
                f"  step {int(rows.steps[r]):2d}  p={float(p[r]):.2f}  alpha={float(out.alpha[r]):.2f}{mask}"
            )


if __name__ == "__main__":
    main()
