"""Running a plan: process groups and sessions (:mod:`.session`, the one place that picks
the device), the training loop (:mod:`.train`), the three modes (:mod:`.modes`), the parity
oracle (:mod:`.parity`), the run-time collective check (:mod:`.guard`), the torchrun
launch (:mod:`.launch`) and tracing one function on a mesh (:mod:`.functions`)."""

from lowering.run.guard import CheckMode, CollectiveGuard, CollectiveMismatch
from lowering.run.modes import Explained, Layout, explain, run, simulate, train_layout
from lowering.run.parity import Parity, check_parity
from lowering.run.registry import ModelRef, resolve
from lowering.run.session import Mode, Session, device_and_backend, session

__all__ = ["Layout", "Explained", "explain", "simulate", "run", "train_layout", "Parity",
           "check_parity", "ModelRef", "resolve", "Mode", "Session", "session",
           "device_and_backend", "CheckMode", "CollectiveGuard", "CollectiveMismatch"]
