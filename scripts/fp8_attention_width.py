"""FP8 attention at full width: FLUX.1-dev's transformer widths (3072 = 24 heads × 128, joint_attention_dim 4096)
with 1 double + 1 single block and random weights, calibrated on random inputs and measured on others: rel-L2 of
the output against float32 PyTorch for the FP8 Linears alone and for FP8 Linears + FP8 attention (the fake
quantization the Q/DQ graph computes; tests/test_fp8_attention.py holds the graph to it within 1e-3).

    .venv/bin/python scripts/fp8_attention_width.py --image-tokens 1024 --text-tokens 256

Peak RSS 5.7 GB at the defaults (the float32 model and two fake-quantized copies, one at a time); 4–8 min on 2 cores."""

from __future__ import annotations

import argparse
import copy
import resource
import time
from collections import defaultdict

import torch
from diffusers import FluxTransformer2DModel

from fluxexport.quantize.calibrate import abs_max, fake_quantize, quantizable_attention, quantizable_linears
from fluxexport.quantize.fp8 import fp8_qdq, observe_attention


def full_width(double: int, single: int) -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=double, num_single_layers=single, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    ).eval()  # fmt: skip


def inputs(image: int, text: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    side = int(image**0.5)
    ids = torch.stack(
        torch.meshgrid(torch.zeros(1), torch.arange(side).float(), torch.arange(side).float(), indexing="ij"), -1
    )
    return {
        "hidden_states": torch.randn(1, image, 64, generator=generator),
        "encoder_hidden_states": torch.randn(1, text, 4096, generator=generator),
        "pooled_projections": torch.randn(1, 768, generator=generator),
        "timestep": torch.rand(1, generator=generator),
        "guidance": torch.full((1,), 3.5),
        "img_ids": ids.reshape(-1, 3).float(),
        "txt_ids": torch.zeros(text, 3),
    }


def block_norms(model) -> dict[str, torch.nn.Module]:
    """The LayerNorms inside the blocks, whose inputs ModelOpt's FLUX recipe also quantizes (ours does not)."""
    return {n: m for n, m in model.named_modules() if n.startswith("transformer_blocks") or
            n.startswith("single_transformer_blocks") if isinstance(m, torch.nn.LayerNorm)}  # fmt: skip


def quantize_norm_inputs(model, amax: dict[str, float]):
    """Per-tensor FP8 Q/DQ on every block LayerNorm's input, as ModelOpt's enabled input quantizers compute."""
    for name, module in block_norms(model).items():
        step = torch.tensor(amax[name] / 448.0)
        module.register_forward_pre_hook(lambda _module, args, step=step: (fp8_qdq(args[0], step), *args[1:]))
    return model


def calibrate(model, draws) -> tuple[dict[str, float], dict[str, float]]:
    """Max calibration of the block Linears' (and LayerNorms') inputs and the attentions' q, k, v, as `fluxexport
    quantize` does."""
    amax: dict[str, float] = defaultdict(float)

    def observer(name):
        return lambda _module, args: amax.__setitem__(name, max(amax[name], abs_max(args[0].detach())))

    observed = quantizable_linears(model) | block_norms(model)
    handles = [m.register_forward_pre_hook(observer(n)) for n, m in observed.items()]
    attention: dict[str, float] = {}
    stops = [observe_attention(m, n, attention) for n, m in quantizable_attention(model).items()]
    with torch.no_grad():
        for feeds in draws:
            model(**feeds)
    for handle in handles:
        handle.remove()
    for stop in stops:
        stop()
    return dict(amax), attention


def rel_l2(a, b) -> float:
    return ((a - b).double().norm() / b.double().norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--double", type=int, default=1)
    parser.add_argument("--single", type=int, default=1)
    parser.add_argument("--image-tokens", type=int, default=1024, help="a square number (1024: 512² pixels)")
    parser.add_argument("--text-tokens", type=int, default=256)
    parser.add_argument("--calibration-draws", type=int, default=3)
    args = parser.parse_args()
    started = time.perf_counter()
    model = full_width(args.double, args.single)
    draws = [inputs(args.image_tokens, args.text_tokens, seed) for seed in range(args.calibration_draws)]
    amax, attention_amax = calibrate(model, draws)
    test = inputs(args.image_tokens, args.text_tokens, seed=1000)
    with torch.no_grad():
        reference = model(**test).sample
        linears = fake_quantize(copy.deepcopy(model), {n: v for n, v in amax.items() if n not in block_norms(model)})
        linears_error = rel_l2(linears(**test).sample, reference)
        del linears
        both = fake_quantize(copy.deepcopy(model), amax, attention_amax=attention_amax)
        both_error = rel_l2(both(**test).sample, reference)
        del both
        norms = quantize_norm_inputs(fake_quantize(copy.deepcopy(model), amax, attention_amax=attention_amax), amax)
        norms_error = rel_l2(norms(**test).sample, reference)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"width 3072, {args.double} double + {args.single} single blocks, {args.image_tokens} image + "
          f"{args.text_tokens} text tokens, random weights; calibrated on {args.calibration_draws} random draws")  # fmt: skip
    print(f"rel-L2 vs float32: FP8 Linears {linears_error:.2e}, FP8 Linears + attention {both_error:.2e}, "
          f"+ ModelOpt's LayerNorm-input Q/DQ {norms_error:.2e}")  # fmt: skip
    print(f"peak RSS {peak:.1f} GB, {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
