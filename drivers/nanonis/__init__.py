"""Nanonis SPM controllers: the ``nanonis:HOST:PORT`` driver (:mod:`drivers.nanonis.driver`,
built on the official ``nanonis_spm`` client) and a protocol emulator backed by the STM
simulator (:mod:`drivers.nanonis.emulator`, ``scopepilot serve-nanonis``). Import the
submodules directly; this package imports nothing heavy."""
