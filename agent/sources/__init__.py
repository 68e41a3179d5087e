"""Sources: threads that open a device in run() and emit Records (GPS serial, CAN, ignition)."""
