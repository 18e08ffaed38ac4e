"""FLUX.1 Redux's two components (`models/redux.py`): the SigLIP image encoder and the Redux embedder. Their one
dynamic axis is the batch (images): the image side is fixed by the folder's image processor, which resizes every
image to the encoder's own size (384² for FLUX.1-Redux-dev), so the token count M = (side/patch)² is fixed too."""

from __future__ import annotations

from fluxexport.dtypes import COMPUTE
from fluxexport.models.redux import ReduxSource
from fluxexport.specs.core import Axis, ComponentSpec, TensorSpec

# Images one prior call encodes (diffusers sums them into one conditioning): 1..4 like the base's batch
REDUX_BATCH = Axis(1, 1, 4)


def redux_specs(redux: ReduxSource, batch: Axis = REDUX_BATCH) -> dict[str, ComponentSpec]:
    """`image_encoder`: pixel_values [B,3,S,S] (normalized to [-1,1]) → image_hidden_states [B,M,W] (SigLIP's last
    hidden state); `image_embedder`: image_hidden_states → image_embeds [B,M,D] (the base's text width)."""
    side, tokens = redux.image_size, redux.image_tokens
    width, text = int(redux.image_encoder["hidden_size"]), redux.text_width
    channels = int(redux.image_encoder["num_channels"])
    hidden = TensorSpec("image_hidden_states", COMPUTE, ("B", tokens, width), (-3.0, 3.0))
    return {
        "image_encoder": ComponentSpec(
            "image_encoder",
            inputs=(TensorSpec("pixel_values", COMPUTE, ("B", channels, side, side)),),
            outputs=(hidden,),
            axes={"B": batch},
            export_sizes={"B": 2},
        ),
        "image_embedder": ComponentSpec(
            "image_embedder",
            inputs=(hidden,),
            outputs=(TensorSpec("image_embeds", COMPUTE, ("B", tokens, text)),),
            axes={"B": batch},
            export_sizes={"B": 2},
        ),
    }
