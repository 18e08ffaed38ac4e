"""FLUX.2's adapters: each takes and returns exactly its spec's tensors (`families/flux2/specs.py`).

- text encoder: the causal LM run up to the deepest layer it is read at (layers past it never run), its hidden
  states at `layers` stacked per token into one [B, L, 3·hidden] embedding, as diffusers' pipelines stack them;
- transformer: `Flux2Transformer2DModel` on 2-D ids (float32 RoPE for export), whole or in the three parts the step
  caches run (head, tail, out: see `TransformerHeadAdapter`);
- VAE decoder / encoder: with the batch-norm (un)normalisation and the 2×2 (un)patchify inside, so that both take
  and give the transformer's 128-channel latent and the runtime never reads VAE statistics.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fluxexport.adapters.parts import TransformerOutAdapter
from fluxexport.adapters.rope import use_float32_rope
from fluxexport.errors import FluxExportError


def language_model(model: nn.Module) -> nn.Module:
    """The decoder stack of a causal LM (Qwen3ForCausalLM.model) or of a VLM's language model (Mistral3)."""
    inner = getattr(model, "model", model)
    return getattr(inner, "language_model", inner)


class TextEncoderAdapter(nn.Module):
    def __init__(self, model: nn.Module, layers: tuple[int, ...]):
        super().__init__()
        stack = language_model(model)
        deepest = max(layers)
        if deepest > len(stack.layers):
            raise FluxExportError(
                f"the text encoder has {len(stack.layers)} layers but FLUX.2 reads hidden state {deepest}: "
                "the text encoder does not belong to this model"
            )
        self.model = model  # the only child, so that parameters keep the checkpoint's names
        cut = copy.copy(stack)  # a shallow copy: the layers are shared, the list is cut
        cut._modules = dict(stack._modules)  # its own table of children: cutting it leaves `model` whole
        if deepest < len(stack.layers):  # hidden state k < depth is layer k's raw output: no final norm after it
            cut.layers, cut.norm = stack.layers[:deepest], nn.Identity()
        object.__setattr__(self, "_stack", cut)  # not a child: its parameters are the model's
        self.layers = tuple(layers)

    @property
    def stack(self) -> nn.Module:
        """The decoder stack this adapter runs: the LM's, cut after the deepest layer read."""
        return self._stack

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        out = self._stack(
            input_ids=input_ids.to(torch.int64),
            attention_mask=attention_mask.to(torch.int64),
            output_hidden_states=True,
            use_cache=False,
        )
        stacked = torch.stack([out.hidden_states[index] for index in self.layers], dim=1)  # B, layers, L, D
        batch, count, length, width = stacked.shape
        return stacked.permute(0, 2, 1, 3).reshape(batch, length, count * width)


class TransformerAdapter(nn.Module):
    def __init__(self, model: nn.Module, guidance: bool, float32_rope: bool = True):
        super().__init__()
        self.model = use_float32_rope(model) if float32_rope else model
        self.guidance = guidance

    def forward(self, hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids, guidance=None):
        return self.model(
            hidden_states=hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            timestep=timestep.to(hidden_states.dtype),
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=guidance if self.guidance else None,
            return_dict=False,
        )[0]


def joint_rope(model: nn.Module, img_ids: torch.Tensor, txt_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of the text tokens then the image tokens: each computed on its own ids and concatenated, as the
    transformer's forward does."""
    image, text = model.pos_embed(img_ids), model.pos_embed(txt_ids)
    return torch.cat([text[0], image[0]], dim=0), torch.cat([text[1], image[1]], dim=0)


class TransformerHeadAdapter(TransformerAdapter):
    """The transformer up to its first double block, as diffusers' forward runs it: the time (and guidance)
    embedding, the double blocks' shared modulations, the embedders and the first block. Its outputs: the first
    block's image residual (what First Block Cache compares), its image and text outputs, the time embedding, the
    image stream that entered the block (what MagCache subtracts), the block's modulated image input (its `norm1`
    shifted and scaled by the attention modulation: what TeaCache compares), and the two double-stream modulation
    vectors.

    Where each weight lives (each in exactly one part; the modulations are ~0.56 B parameters at FLUX.2 [dev]'s
    size, so none is repeated): the head holds the embedders, `time_guidance_embed`, the first block and the two
    double-stream modulations, which every double block reads, so the head computes them once and hands the
    vectors ([B, 6·width] each) to the tail; the tail holds the other double blocks, the single blocks and
    `single_stream_modulation`, computed there from `temb` (only the single blocks read it, so a step whose
    blocks are skipped never computes it); the output part holds `norm_out` and `proj_out`."""

    def forward(self, hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids, guidance=None):
        model, dtype = self.model, hidden_states.dtype
        guidance = guidance.to(dtype) * 1000 if self.guidance else None
        temb = model.time_guidance_embed(timestep.to(dtype) * 1000, guidance)
        image_modulation = model.double_stream_modulation_img(temb)
        text_modulation = model.double_stream_modulation_txt(temb)
        embedded = model.x_embedder(hidden_states)
        first = model.transformer_blocks[0]
        shift, scale = image_modulation[:, None].chunk(6, dim=-1)[:2]  # the attention's shift and scale
        modulated = (1 + scale) * first.norm1(embedded) + shift
        text, image = first(
            hidden_states=embedded,
            encoder_hidden_states=model.context_embedder(encoder_hidden_states),
            temb_mod_img=image_modulation,
            temb_mod_txt=text_modulation,
            image_rotary_emb=joint_rope(model, img_ids, txt_ids),
        )
        return image - embedded, image, text, temb, embedded, modulated, image_modulation, text_modulation


class TransformerTailAdapter(nn.Module):
    """Every block after the first: the other double blocks (with the head's modulation vectors), then the text
    and image streams joined for the single blocks (with `single_stream_modulation` of `temb`); returns the image
    stream after them."""

    def __init__(self, model: nn.Module, float32_rope: bool = True):
        super().__init__()
        self.model = use_float32_rope(model) if float32_rope else model

    def forward(self, image_hidden, text_hidden, temb, image_modulation, text_modulation, img_ids, txt_ids):
        model, text, image = self.model, text_hidden, image_hidden
        rope = joint_rope(model, img_ids, txt_ids)
        for block in model.transformer_blocks[1:]:
            text, image = block(
                hidden_states=image, encoder_hidden_states=text, temb_mod_img=image_modulation,
                temb_mod_txt=text_modulation, image_rotary_emb=rope,
            )  # fmt: skip
        joint = torch.cat([text, image], dim=1)  # [B, L+N, width]: text tokens first
        single_modulation = model.single_stream_modulation(temb)
        for block in model.single_transformer_blocks:
            joint = block(hidden_states=joint, encoder_hidden_states=None, temb_mod=single_modulation,
                          image_rotary_emb=rope)  # fmt: skip
        return joint[:, text.shape[1] :]


def batch_norm_stats(vae: nn.Module, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) [1,C,1,1] of the VAE's latent batch norm, as the pipelines compute them."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
    return mean, std


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """[B,C,H,W] → [B,4C,H/2,W/2]: each 2×2 patch into channels (diffusers' _patchify_latents)."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return patches.reshape(b, c * 4, h // 2, w // 2)


def unpatchify(latents: torch.Tensor) -> torch.Tensor:
    """[B,4C,h,w] → [B,C,2h,2w]; the inverse of `patchify`."""
    b, c, h, w = latents.shape
    patches = latents.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return patches.reshape(b, c // 4, h * 2, w * 2)


class VaeDecoderAdapter(nn.Module):
    """Normalised patchified latent [B,128,h,w] → images [B,3,16h,16w]."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        mean, std = batch_norm_stats(self.vae, latent)
        return self.vae.decode(unpatchify(latent * std + mean), return_dict=False)[0]


class VaeEncoderAdapter(nn.Module):
    """Images [B,3,H,W] → the posterior mean, patchified and normalised [B,128,H/16,W/16] (sample_mode "argmax")."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, images):
        latent = patchify(self.vae.encode(images).latent_dist.mode())
        mean, std = batch_norm_stats(self.vae, latent)
        return (latent - mean) / std


NAMES = ("text_encoder", "transformer", "vae_decoder", "vae_encoder", "transformer_head", "transformer_tail",
         "transformer_out")  # fmt: skip


def wrap(name: str, module: nn.Module, guidance: bool, float32_rope: bool, text_layers: tuple[int, ...]) -> nn.Module:
    """The adapter of component `name` around its loaded module (`text_layers`: the LM layers the text encoder
    stacks)."""
    if name == "text_encoder":
        return TextEncoderAdapter(module, text_layers).eval()
    if name == "transformer":
        return TransformerAdapter(module, guidance, float32_rope).eval()
    if name == "transformer_head":
        return TransformerHeadAdapter(module, guidance, float32_rope).eval()
    if name == "transformer_tail":
        return TransformerTailAdapter(module, float32_rope).eval()
    if name == "transformer_out":
        return TransformerOutAdapter(module).eval()
    if name == "vae_decoder":
        return VaeDecoderAdapter(module).eval()
    if name == "vae_encoder":
        return VaeEncoderAdapter(module).eval()
    raise FluxExportError(f"FLUX.2 has no component {name!r}: choose one of {', '.join(NAMES)}")
