"""A new user's first hour: the first import is quiet and light; what this package downloads fails
offline with an error that says what was fetched from where and how to supply it."""
import subprocess
import sys

IMPORT_CHECK = r"""
import sys, warnings
import avalanche_hat, avalanche_hat.modules, avalanche_hat.mechanism
heavy = [m for m in ("avalanche", "timm", "torchvision") if m in sys.modules]
assert not heavy, f"import avalanche_hat imported {heavy}"
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from avalanche_hat import HAT
assert not caught, [f"{w.category.__name__}: {w.message}" for w in caught]
assert "timm" not in sys.modules, "from avalanche_hat import HAT imported timm"
"""


def test_the_first_import_is_light_and_from_avalanche_hat_import_hat_emits_no_warning():
    subprocess.run([sys.executable, "-c", IMPORT_CHECK], check=True)
