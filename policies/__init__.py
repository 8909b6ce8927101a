"""Decision makers: the Policy protocol, rule policies (and later RL policies, scan planners)."""
