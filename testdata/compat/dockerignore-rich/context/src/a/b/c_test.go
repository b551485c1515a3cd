src/a/b/c_test.go
