"""Transfer tests: make the helper module importable whatever the import mode."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
