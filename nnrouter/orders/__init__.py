"""Orders: what was ordered (DICOM header, HL7 v2, worklist answers), the procedure-to-views book and the ordered-vs-performed check."""
