"""Make the fixtures of ``tests/test_dalle_dvae.py`` with OpenAI's ORIGINAL ``dall-e`` package.

Not run by the tests (lm4lv never imports ``dall_e``). To remake the files::

    pip download dall-e==0.1 --no-deps -d /tmp/dalle && unzip /tmp/dalle/DALL_E-0.1-py3-none-any.whl -d /tmp/dalle/ext
    pip install --target /tmp/dalle-extra attrs requests     # dall_e imports both, declares neither
    PYTHONPATH=/tmp/dalle/ext:/tmp/dalle-extra python tests/data/dalle_tiny/make_fixture.py

Writes, beside this script:

* ``decoder.pkl``: a tiny ``dall_e.decoder.Decoder`` saved with ``torch.save(model)``, the way
  OpenAI's published ``decoder.pkl`` was written (``dall_e.load_model`` reads it with ``torch.load``).
  The original's attrs validators demand ``n_hid >= 64`` and ``vocab_size >= 512``; they are
  switched off (``attr.validators.disabled()``) to build a small one with the original code.
  Biases are random (the original initialises them to zero) so that the test sees them, and the
  output convolution is scaled ×20 (bias +1.5) so that ``unmap_pixels`` clamps some pixels to 0 and to 1.
* ``decoder_legacy.pkl``: the same in torch's pre-1.6 (non-zip) format, in case a copy of the
  published file is in that format.
* ``expected.safetensors``: ``codes`` [2, 4, 3] (int64), the original's raw output ``logits``
  [2, 6, 32, 24] for their one-hot encoding, and ``pixels`` = ``unmap_pixels(sigmoid(logits[:, :3]))``.
* ``default_shapes.json``: parameter name → shape of the original's DEFAULT decoder (the published
  architecture), so the tests can check the names without its 175 MB of weights (43,829,766 float32 parameters).
"""

import json
from pathlib import Path

import attr
import torch
import torch.nn.functional as F
from dall_e.decoder import Decoder
from dall_e.utils import unmap_pixels
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
TINY = dict(n_init=8, n_hid=4, n_blk_per_group=2, output_channels=3, vocab_size=32)


def main() -> None:
    torch.manual_seed(0)
    with attr.validators.disabled():
        model = Decoder(**TINY)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".b"):
                p.normal_(std=0.1)
        model.blocks.output.conv.w.mul_(20.0)  # logits of a few units: unmap_pixels clamps at both ends
        model.blocks.output.conv.b.add_(1.5)
    model.eval()
    torch.save(model, HERE / "decoder.pkl")
    torch.save(model, HERE / "decoder_legacy.pkl", _use_new_zipfile_serialization=False)

    codes = torch.randint(0, TINY["vocab_size"], (2, 4, 3), generator=torch.Generator().manual_seed(1))
    z = F.one_hot(codes, num_classes=TINY["vocab_size"]).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        logits = model(z).float()
    pixels = unmap_pixels(torch.sigmoid(logits[:, :3]))
    save_file({"codes": codes, "logits": logits.contiguous(), "pixels": pixels.contiguous()},
              str(HERE / "expected.safetensors"))
    print(f"logits {tuple(logits.shape)} in [{logits.min():.3f}, {logits.max():.3f}]; pixels at 0: "
          f"{(pixels == 0).float().mean():.3f}, at 1: {(pixels == 1).float().mean():.3f}")

    full = Decoder()  # OpenAI's defaults: n_init=128, n_hid=256, n_blk_per_group=2, vocab_size=8192
    shapes = {k: list(v.shape) for k, v in full.state_dict().items()}
    (HERE / "default_shapes.json").write_text(json.dumps(shapes, indent=0) + "\n")
    print(f"default decoder: {len(shapes)} tensors, {sum(p.numel() for p in full.parameters())} parameters")


if __name__ == "__main__":
    main()
