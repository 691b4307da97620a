"""Switch the test files owned by others to tests.zoo, then delete the three re-export modules.

Run from the repository root after merging branch ``zoo`` and the branches editing these files:
``python notes/zoo_switch.py``. Each replacement must match; the script stops at the first one
that does not, naming file and text (then edit that line by hand, see notes/zoo.md).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

WORD = r"(?<![\w.])"  # a bare name, not an attribute and not part of a longer name

# file -> [(regex, replacement, expected count or None for "at least one")]
EDITS: dict[str, list[tuple[str, str, int | None]]] = {
    "tests/converters/test_cli.py": [
        (
            r"from \.twins import TorchConvNet, randomize_torch, same_bits\n",
            "from tests.zoo import torch_models\nfrom tests.zoo.arrays import randomize_torch, same_bits\n",
            1,
        ),
        (WORD + r"TorchConvNet\b", "torch_models.Conv1dNormNet", None),
    ],
    "tests/converters/test_files.py": [
        (
            r"from \.twins import \(\n(    \w+,\n)+\)\n",
            "from tests.zoo import flax_models, torch_models\n"
            "from tests.zoo.arrays import flax_arrays, randomize_flax, randomize_torch, same_bits, torch_arrays\n"
            "from tests.zoo.layers import DTYPES, NUMPY_DTYPES, TORCH_DTYPES\n",
            1,
        ),
        (WORD + r"TorchConvNet\b", "torch_models.Conv1dNormNet", None),
        (WORD + r"FlaxConvNet\b", "flax_models.Conv1dNormNet", None),
    ],
    "tests/converters/test_merge.py": [
        (
            r"from \.twins import \(\n(    \w+,\n)+\)\n",
            "from tests.zoo import flax_models, torch_models\n"
            "from tests.zoo.arrays import flax_output, randomize_flax, randomize_torch, torch_output\n"
            "from tests.zoo.layers import conv_batch\n",
            1,
        ),
        (WORD + r"TorchConvNet\b", "torch_models.Conv1dNormNet", None),
        (WORD + r"FlaxConvNet\b", "flax_models.Conv1dNormNet", None),
        (WORD + r"TorchTokenNet\b", "torch_models.TokenNet", None),
    ],
    "tests/converters/test_peft.py": [
        (
            r"from \.twins import FlaxConvNet, TorchConvNet, conv_batch, flax_output, randomize_torch, torch_output\n",
            "from tests.zoo import flax_models, torch_models\n"
            "from tests.zoo.arrays import flax_output, randomize_torch, torch_output\n"
            "from tests.zoo.layers import conv_batch\n",
            1,
        ),
        (WORD + r"TorchConvNet\b", "torch_models.Conv1dNormNet", None),
        (WORD + r"FlaxConvNet\b", "flax_models.Conv1dNormNet", None),
    ],
    "tests/converters/test_sharded.py": [
        (
            r"(?m)^from flax_impl\.sharding import shard_model\n",
            "from flax_impl.sharding import shard_model\n"
            "from tests.zoo import flax_models, torch_models\n"
            "from tests.zoo.flax_models import MixedDtypeLayers\n",
            1,
        ),
        (r"class ConvNet\(nnx\.Module\):\n(        .*\n|    .*\n)+\n\n", "", 1),
        (r"class TorchMLP\(torch\.nn\.Module\):\n(.+\n|\n(?=    ))+\n\n", "", 1),
        (r"class FlaxMLP\(nnx\.Module\):\n(.+\n|\n(?=    ))+\n\n", "", 1),
        (WORD + r"ConvNet\(nnx\.Rngs\(0\)\)", "MixedDtypeLayers(nnx.Rngs(0))", 3),
        (
            r"torch_model = TorchMLP\(\)",
            "torch_model = torch_models.MLP(in_features=8, hidden=16, out_features=4)",
            1,
        ),
        (r"FlaxMLP\(nnx\.Rngs\(0\)\)", "flax_models.MLP(8, 16, 4, rngs=nnx.Rngs(0))", 1),
        (
            r'\{"fc1": \(None, "model"\), "fc2": \("model", None\)\}',
            '{"layer1": (None, "model"), "head": ("model", None)}',
            1,
        ),
        (r"twin\.fc1\.kernel", "twin.layer1.kernel", 1),
    ],
    "tests/examples/test_adam_state.py": [
        (r"from collections import OrderedDict\n", "", 1),
        (
            r"(from examples\.adam_state import AdamStateError, torch_adamw_to_optax  # noqa: E402\n)",
            r"\1from tests.zoo import flax_models, torch_models  # noqa: E402\n",
            1,
        ),
        (
            r"class FlaxNet\(nnx\.Module\):\n(.+\n|\n(?=    ))+\n\ndef torch_net\(\) -> torch\.nn\.Module:\n(    .+\n)+\n\n",
            "",
            1,
        ),
        (WORD + r"torch_net\(\)", "torch_models.MLP()", 1),
        (WORD + r"FlaxNet\(nnx\.Rngs\(0\)\)", "flax_models.MLP(rngs=nnx.Rngs(0))", 1),
    ],
    "tests/torch_impl/test_merge.py": [
        (r"from tests\.torch_impl import models\n", "from tests.zoo import torch_models\n", 1),
        (r"\bmodels\.conv_net_input\(", "torch_models.mixed_conv_net_input(", None),
        (r"\bmodels\.conv_net\(", "torch_models.MixedConvNet(", None),
        (r"\bmodels\.mlp_input\(", "torch_models.seed_mlp_input(", None),
        (r"\bmodels\.mlp\(", "torch_models.SeedMLP(", None),
    ],
    "tests/flax_impl/test_merge.py": [
        (
            r"from tests\.flax_impl\.models import ConvNet, Net\n",
            "from tests.zoo.flax_models import Conv2dBatchNormNet, SeedMLP\n",
            1,
        ),
        (WORD + r"ConvNet\(", "Conv2dBatchNormNet(", None),
        (WORD + r"Net\(", "SeedMLP(", None),
    ],
}

RE_EXPORTS = ("tests/converters/twins.py", "tests/torch_impl/models.py", "tests/flax_impl/models.py")


def main() -> int:
    for name, edits in EDITS.items():
        path = Path(name)
        text = path.read_text()
        for pattern, replacement, expected in edits:
            text, count = re.subn(pattern, replacement, text)
            if count == 0 or (expected is not None and count != expected):
                print(
                    f"{name}: {pattern!r} replaced {count} time(s), expected {expected or 'some'}",
                    file=sys.stderr,
                )
                return 1
        path.write_text(text)
    for name in RE_EXPORTS:
        Path(name).unlink()
    stale = [
        str(p)
        for p in Path("tests").rglob("*.py")
        if re.search(
            r"from \.twins import|tests\.converters\.twins|tests\.(torch|flax)_impl(\.| import )models\b",
            p.read_text(),
        )
    ]
    if stale:
        print("still importing a removed module: " + ", ".join(stale), file=sys.stderr)
        return 1
    print("switched; now run: ruff format tests && ruff check --fix tests")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
