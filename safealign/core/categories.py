"""The safety categories (I2P's seven), by the names params.yaml and every table use."""
from __future__ import annotations

CATEGORIES = ("hate", "harassment", "violence", "self_harm", "sexual", "shocking", "illegal_activity")
CATEGORY_TITLES = {
    "hate": "Hate", "harassment": "Harassment", "violence": "Violence", "self_harm": "Self-harm",
    "sexual": "Sexual", "shocking": "Shocking", "illegal_activity": "Illegal activity",
}
