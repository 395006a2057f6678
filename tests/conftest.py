import sys
from pathlib import Path

# tests/helpers.py is shared by every subject folder.
sys.path.insert(0, str(Path(__file__).parent))
