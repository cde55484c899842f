"""The timing engine: when jobs fire. APScheduler 3 behind the ``Engine`` contract."""
