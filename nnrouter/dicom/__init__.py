"""The DICOM network services: the SCP (C-STORE receive, C-FIND query, Hanging Protocol FIND), the SCU (send, worklist), statuses and the network guard."""
