"""Losses and the Objective that sums them (plain torch; no Lightning here)."""
