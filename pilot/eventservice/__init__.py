"""Event service: ranges fed to the payload, outputs reported per range."""
