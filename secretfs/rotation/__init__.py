"""Secret rotation: when a secret is due (``schedule``) and the work of rotating it."""
