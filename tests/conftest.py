"""Test-session settings: offline, analytics off, one CPU thread, forms by the model, a private cache folder.

One torch thread (override with TEST_THREADS): the tests run small tensors, where a second thread
saves little on a quiet machine and, on a busy one, costs up to 10x through threads waiting on each
other. Subprocesses started by tests (CLI, DDP) inherit the same limit through OMP_NUM_THREADS.
"""

from __future__ import annotations

import os
import tempfile

import torch

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PERSONALIZE_FORMS", "model")  # forms chosen by multiply-adds: deterministic (adapters/forms.py)
os.environ.setdefault("PERSONALIZE_CACHE", tempfile.mkdtemp(prefix="personalize-test-cache-"))  # never the user's cache
THREADS = int(os.environ.get("TEST_THREADS", "1"))
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
torch.set_num_threads(THREADS)
