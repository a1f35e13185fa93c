"""The report's sections: each turns the result tables into the plain values its template part shows."""
