"""Decision makers: the Policy protocol, rule policies, RL environments and RL policies."""
