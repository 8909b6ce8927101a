"""The operator's web console: a Starlette app (:mod:`agent.console.app`) served by uvicorn
(:mod:`agent.console.server`) over an :class:`agent.control.Controller`."""
