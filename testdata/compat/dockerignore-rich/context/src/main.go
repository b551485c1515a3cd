src/main.go
