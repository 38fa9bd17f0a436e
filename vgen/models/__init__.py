"""Networks only (nn.Modules): they know tensors, never files or configs on disk.

`NETWORKS` is the registry `network.type` chooses from. Every conditional network has the
signature `network(x, t, text)` with `text` a vgen.text.encoder.TextFeatures, is built as
`Network(cfg, text_width, pooled_width)` and names its config class `Network.Config` (a dataclass
with `type`, `image_size` and `channels`), so a family never special-cases a network.
"""

from __future__ import annotations

from vgen.models.dit import DiT
from vgen.models.unet import UNet

NETWORKS = {"dit": DiT, "unet": UNet}
NETWORK_CONFIGS = {name: network.Config for name, network in NETWORKS.items()}


def build_network(cfg, text_width: int, pooled_width: int):
    return NETWORKS[cfg.type](cfg, text_width, pooled_width)
