import os
import sys

# The project is a folder of scripts, not a package: make its files importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest


@pytest.fixture(scope="session")
def shared_data(tmp_path_factory):
    """One data dir for the whole session: the digits (rendered once, ~10 s) and the
    digits classifier (trained once, ~25 s) are reused by every test that needs them."""
    return str(tmp_path_factory.mktemp("shared-data"))
