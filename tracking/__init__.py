"""Tracking core: pure numpy / scipy / filterpy (no cv2, torch or web code)."""
from .checkout import CheckoutAssembler, LineCrossingCounter, TrayParams
from .kalman import KalmanBoxFilter
from .menu import Menu, MenuError, PricedReceipt
from .tracker import Tracker, TrackUpdate
from .types import CheckoutEvent, CheckoutItem, Crossing, Detections, Frame, Track, TrackState
from .geometry import iou_matrix

__all__ = [
    "CheckoutAssembler",
    "CheckoutEvent",
    "CheckoutItem",
    "Crossing",
    "Detections",
    "Frame",
    "KalmanBoxFilter",
    "LineCrossingCounter",
    "Menu",
    "MenuError",
    "PricedReceipt",
    "Track",
    "TrackState",
    "TrackUpdate",
    "Tracker",
    "TrayParams",
    "iou_matrix",
]
