"""The real-time agent: acquisition, perception, decision, safety gate, recording, CLI."""
