"""The closed loop: `Trainer(...).fit`, process supervision, runners and `lightspan demo`."""
