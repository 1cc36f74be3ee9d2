# Makes `import cbharness` work without PYTHONPATH when running
#   /usr/bin/python3 -m pytest tests/harness
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
