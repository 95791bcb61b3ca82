"""What the tests (and bench) share: real servers and processes (``servers``), event builders
(``lifecycles``, ``streams``), reading state back (``readback``) and typed Redis replies
(``replies``)."""
