import os
import sys

# The project is a folder of scripts, not a package: make its files importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
