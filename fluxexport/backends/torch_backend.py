"""PyTorch reference backend: the diffusers / transformers modules of a checkpoint, behind the specs' names."""

from __future__ import annotations

import functools

import torch

from fluxexport.backends.base import Component, Feeds
from fluxexport.errors import FluxExportError
from fluxexport.models.single_file import load_bfl_transformer
from fluxexport.models.source import ModelSource

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise FluxExportError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_transformer(source: ModelSource, dtype: torch.dtype = torch.float32):
    """The FluxTransformer2DModel: from the folder, or converted from a BFL single-file checkpoint."""
    from diffusers import FluxTransformer2DModel

    if source.transformer_file is None:
        return FluxTransformer2DModel.from_pretrained(source.root, subfolder="transformer", torch_dtype=dtype)
    return load_bfl_transformer(source.transformer_file, source.root, dtype)


def load_clip(source: ModelSource, dtype: torch.dtype = torch.float32):
    from transformers import CLIPTextModel

    return CLIPTextModel.from_pretrained(source.root, subfolder="text_encoder", dtype=dtype)


def load_t5(source: ModelSource, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None):
    """T5 encoder; export passes attn_implementation="eager" (sdpa does not trace under dynamo)."""
    from transformers import T5EncoderModel

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return T5EncoderModel.from_pretrained(source.root, subfolder="text_encoder_2", dtype=dtype, **kwargs)


def load_vae(source: ModelSource, dtype: torch.dtype = torch.float32):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(source.root, subfolder="vae", torch_dtype=dtype)


class TorchBackend:
    """Components as eager PyTorch modules on CPU or CUDA, in fp32, bf16 or fp16."""

    name = "torch"

    def __init__(self, source: ModelSource, dtype: str = "fp32", device: str | None = None):
        self.source = source
        self.dtype = parse_dtype(dtype)
        self.device = torch.device(device or default_device())

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.is_floating_point():
            return tensor.to(self.device, self.dtype)
        return tensor.to(self.device, torch.long)

    @staticmethod
    def _output(tensor: torch.Tensor) -> torch.Tensor:
        """Outputs stay on the backend's device, as float32 (the runtime's state dtype)."""
        return tensor.detach().to(torch.float32)

    @functools.cache  # noqa: B019 - one backend per model, kept for the process
    def module(self, name: str) -> torch.nn.Module:
        """The loaded nn.Module behind a component ("vae" serves both VAE components), in eval mode."""
        loaders = {"clip": load_clip, "t5": load_t5, "transformer": load_transformer, "vae": load_vae}
        return loaders[name](self.source, self.dtype).to(self.device).eval()

    @functools.cache  # noqa: B019
    def component(self, name: str) -> Component:
        builders = {
            "clip": self._clip,
            "t5": self._t5,
            "transformer": self._transformer,
            "vae_decoder": self._vae_decoder,
            "vae_encoder": self._vae_encoder,
        }
        if name not in builders:
            raise FluxExportError(f"unknown component {name!r}: choose one of {', '.join(builders)}")
        return builders[name]()

    def _clip(self) -> Component:
        model = self.module("clip")

        @torch.inference_mode()
        def run(feeds: Feeds) -> Feeds:
            out = model(self._to_device(feeds["input_ids"]), output_hidden_states=False)
            return {
                "text_embeddings": self._output(out.last_hidden_state),
                "pooled_embeddings": self._output(out.pooler_output),
            }

        return run

    def _t5(self) -> Component:
        model = self.module("t5")

        @torch.inference_mode()
        def run(feeds: Feeds) -> Feeds:
            return {"text_embeddings": self._output(model(self._to_device(feeds["input_ids"]))[0])}

        return run

    def _transformer(self) -> Component:
        model = self.module("transformer")

        @torch.inference_mode()
        def run(feeds: Feeds) -> Feeds:
            guidance = feeds.get("guidance")
            out = model(
                hidden_states=self._to_device(feeds["hidden_states"]),
                encoder_hidden_states=self._to_device(feeds["encoder_hidden_states"]),
                pooled_projections=self._to_device(feeds["pooled_projections"]),
                timestep=self._to_device(feeds["timestep"]),
                img_ids=feeds["img_ids"].to(self.device, self.dtype),
                txt_ids=feeds["txt_ids"].to(self.device, self.dtype),
                # diffusers keeps guidance in float32 whatever the model dtype
                guidance=None if guidance is None else guidance.to(self.device, torch.float32),
                return_dict=False,
            )[0]
            return {"latent": self._output(out)}

        return run

    def _vae_decoder(self) -> Component:
        vae = self.module("vae")

        @torch.inference_mode()
        def run(feeds: Feeds) -> Feeds:
            return {"images": self._output(vae.decode(self._to_device(feeds["latent"]), return_dict=False)[0])}

        return run

    def _vae_encoder(self) -> Component:
        vae = self.module("vae")

        @torch.inference_mode()
        def run(feeds: Feeds) -> Feeds:
            posterior = vae.encode(self._to_device(feeds["images"])).latent_dist
            return {"latent": self._output(posterior.mode())}

        return run
